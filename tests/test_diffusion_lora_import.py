"""diffusers- and kohya-format U-Net LoRAs onto the NNX U-Net: the output of diffusers' own loader, to 1e-4."""
import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from peft_jax.adapters.import_diffusers import apply_diffusers_lora  # noqa: E402
from peft_jax.models import from_pretrained  # noqa: E402
from peft_jax.t2i import sample  # noqa: E402

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 16, 16, 4), dtype=np.float32)
T = np.array([10, 700])
CONTEXT = RNG.standard_normal((2, 9, 32), dtype=np.float32)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


@pytest.fixture(scope="module")
def diffusers_lora(tiny_pipeline, tmp_path_factory) -> pathlib.Path:
    """A rank-4 LoRA trained (here: randomised) with diffusers + peft and saved by save_lora_weights."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape))
    folder = tmp_path_factory.mktemp("lora") / "diffusers"
    diffusers.StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    return folder


def relayout(folder: pathlib.Path, out: pathlib.Path, layout: str, alpha: float = 4.0) -> pathlib.Path:
    """The saved LoRA rewritten in another layout: peft's lora_A/lora_B names, or kohya's underscored names with
    lora_down/lora_up and a per-module alpha (scale alpha / r)."""
    arrays = {}
    for key, value in load_file(str(folder / "pytorch_lora_weights.safetensors")).items():
        module, part = re.fullmatch(r"unet\.(.+)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight", key).groups()
        down = part in ("lora_A", "lora.down")
        if layout == "peft":
            arrays[f"unet.{module}.lora_{'A' if down else 'B'}.weight"] = value
            continue
        stem = "lora_unet_" + module.replace(".", "_")
        if down:
            arrays[f"{stem}.lora_down.weight"] = value
            arrays[f"{stem}.alpha"] = np.asarray(alpha, np.float32)
        else:
            arrays[f"{stem}.lora_up.weight"] = value * np.float32(value.shape[1] / alpha)  # the same product
    save_file(arrays, str(out))
    return out


def diffusers_output(tiny_pipeline, lora: pathlib.Path) -> np.ndarray:
    """StableDiffusionPipeline.load_lora_weights' U-Net part: lora_state_dict, then load_lora_into_unet."""
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet")
    state_dict, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(lora))
    diffusers.StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet=unet)
    with torch.no_grad():
        return unet(torch.from_numpy(X).permute(0, 3, 1, 2), torch.from_numpy(T),
                    torch.from_numpy(CONTEXT)).sample.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def base_unet(tiny_pipeline):
    return from_pretrained("unet2d_condition", tiny_pipeline)


@nnx.jit
def run_unet(unet, x, t, context):
    return unet(x, t, context)


def ours(base_unet, lora: pathlib.Path | None) -> np.ndarray:
    unet = nnx.clone(base_unet)
    if lora is not None:
        cfg = apply_diffusers_lora(unet, lora)
        assert cfg.rank == 4 and cfg.method == "lora"
    return np.asarray(run_unet(unet, jnp.asarray(X), jnp.asarray(T), jnp.asarray(CONTEXT)))


def test_diffusers_and_kohya_loras_give_diffusers_output(tiny_pipeline, base_unet, diffusers_lora, tmp_path):
    want = diffusers_output(tiny_pipeline, diffusers_lora)
    np.testing.assert_allclose(ours(base_unet, diffusers_lora), want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(ours(base_unet, None), want, atol=1e-3)  # the LoRA changes the output

    for layout in ("peft", "kohya"):
        lora = relayout(diffusers_lora, tmp_path / f"{layout}.safetensors", layout, alpha=2.0)
        want_here = diffusers_output(tiny_pipeline, lora)  # diffusers' own reading of that layout
        np.testing.assert_allclose(want_here, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ours(base_unet, lora), want_here, rtol=1e-4, atol=1e-4)


def test_foreign_keys_are_errors_naming_them(base_unet, diffusers_lora, tmp_path):
    arrays = load_file(str(diffusers_lora / "pytorch_lora_weights.safetensors"))
    unet = nnx.clone(base_unet)
    save_file({**arrays, "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((4, 32), np.float32)},
              str(tmp_path / "te.safetensors"))
    with pytest.raises(ValueError, match="lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight is a "
                                         "text-encoder LoRA"):
        apply_diffusers_lora(unet, tmp_path / "te.safetensors")
    save_file({**arrays, "unet.down_blocks.7.attentions.0.to_q.lora_A.weight": np.zeros((4, 32), np.float32)},
              str(tmp_path / "odd.safetensors"))
    with pytest.raises(ValueError, match="down_blocks.7.attentions.0.to_q is not a linear layer of this U-Net"):
        apply_diffusers_lora(unet, tmp_path / "odd.safetensors")


def test_generate_takes_a_diffusers_lora(tiny_pipeline, diffusers_lora, tmp_path):
    """generate (launch/generate.py --adapter) with a diffusers folder: no train_t2i adapter_config.json is asked for."""
    from PIL import Image

    paths = sample.generate(tiny_pipeline, ["x"], tmp_path / "out", adapter=diffusers_lora, sampler="euler",
                              steps=1, batch_size=1, image_size=32)
    assert np.asarray(Image.open(paths[0])).shape == (32, 32, 3)
