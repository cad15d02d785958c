"""Sample images from a Stable Diffusion pipeline folder, optionally with an adapter trained by
launch/train_t2i.py (peft_jax/t2i/sample.py).

    python launch/generate.py --base /models/stable-diffusion-v1-5 --adapter runs/sd15_lora/adapter \
        --prompt "No acute cardiopulmonary process." --prompt "Small left pleural effusion." \
        --num_images 4 --sampler ddim --steps 50 --guidance 7.5 --seed 0 --out samples/

Writes ``<prompt>_<image>.png``, ``grid.png`` and ``prompts.json`` into ``--out`` and prints the paths.
"""
from __future__ import annotations

from peft_jax import runtime

if __name__ == "__main__":
    runtime.setup()  # re-executes with tcmalloc preloaded, before jax is imported

from absl import app, flags  # noqa: E402

from peft_jax.models.diffusion import schedulers  # noqa: E402

_BASE = flags.DEFINE_string("base", None, "Diffusers Stable Diffusion pipeline folder.")
_ADAPTER = flags.DEFINE_string("adapter", None, "A train_t2i adapter folder (RUN/adapter), or a diffusers / kohya "
                                "LoRA folder or .safetensors file; none: the base model.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A text file with one prompt a line.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 1, "Images per prompt.")
_SAMPLER = flags.DEFINE_enum("sampler", "ddim", sorted(schedulers.SAMPLERS), "Sampler.")
_STEPS = flags.DEFINE_integer("steps", 50, "Sampling steps.")
_GUIDANCE = flags.DEFINE_float("guidance", 7.5, "Classifier-free guidance scale (1: no guidance).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the initial noise.")
_OUT = flags.DEFINE_string("out", "samples", "Output folder.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 4, "Images per sampling batch.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Pixels (0: the adapter's training size, else the base's).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _BASE.value:
        raise app.UsageError("--base: set it to a diffusers Stable Diffusion pipeline folder")
    from peft_jax.t2i import sample

    prompts = sample.read_prompts(_PROMPT.value, _PROMPTS_FILE.value)
    paths = sample.generate(_BASE.value, prompts, _OUT.value, adapter=_ADAPTER.value, num_images=_NUM_IMAGES.value,
                            sampler=_SAMPLER.value, steps=_STEPS.value, guidance=_GUIDANCE.value, seed=_SEED.value,
                            batch_size=_BATCH_SIZE.value, image_size=_IMAGE_SIZE.value)
    print("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    runtime.run(main)
