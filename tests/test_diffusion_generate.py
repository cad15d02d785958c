"""launch/generate.py (peft_jax/t2i/sample.py) and the diffusers LoRA export on a tiny SD pipeline (peft_jax.testing)
with a LoRA adapter written by the t2i run: PNGs, grid and printed paths; clear errors for an adapter of another base or with
another method config; the export loaded by diffusers' LoRA loader gives our U-Net's output (unmerged and merged)."""
import json
import pathlib
import runpy
import shutil

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from PIL import Image
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

ROOT = pathlib.Path(__file__).resolve().parents[1]
GENERATE = runpy.run_path(str(ROOT / "launch" / "generate.py"))  # the flag shell itself (defines its flags)

from peft_jax.adapters import apply_peft, merge, trainable_filter  # noqa: E402
from peft_jax.adapters.io import load_adapter, read_adapter_config  # noqa: E402
from peft_jax.metrics import fid  # noqa: E402
from peft_jax.models import from_pretrained  # noqa: E402
from peft_jax.t2i import sample  # noqa: E402
from peft_jax.t2i import train as t2i_train  # noqa: E402


@pytest.fixture(scope="module")
def lora_run(tiny_pipeline, sd15_config, tmp_path_factory) -> pathlib.Path:
    """Two LoRA steps (rank 4, alpha 8) at a high learning rate on 8 generated images: a visibly non-zero adapter."""
    root = tmp_path_factory.mktemp("lora_run")
    rng = np.random.default_rng(0)
    for i in range(8):
        folder = root / "images" / ("normal", "effusion")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = sd15_config("lora")
    cfg.init.checkpoint = str(tiny_pipeline)
    cfg.model.image_size = 32
    cfg.peft.update(rank=4, alpha=8.0)
    cfg.dataset.manual_dir = str(root / "images")
    cfg.train.update(num_steps=2, batch_size=4, lr=0.05, log_every=0)
    t2i_train.train(cfg, root / "run")
    return root / "run"


def test_generate_cli_writes_pngs_grid_and_paths(tiny_pipeline, lora_run, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("Small left pleural effusion.\n\n")
    out = tmp_path / "out"
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["generate.py", f"--base={tiny_pipeline}", f"--adapter={lora_run / 'adapter'}",
                 "--prompt=No acute cardiopulmonary process.", f"--prompts_file={tmp_path / 'prompts.txt'}",
                 "--num_images=2", "--sampler=euler", "--steps=2", "--guidance=3", "--seed=0", "--batch_size=3",
                 f"--out={out}"])
    GENERATE["main"](["generate.py"])
    printed = capsys.readouterr().out.split()
    names = ["000_00.png", "000_01.png", "001_00.png", "001_01.png", "grid.png"]
    assert printed == [str(out / n) for n in names]  # 4 images in 2 batches of 3 (the last one padded)
    assert json.loads((out / "prompts.json").read_text())["001_01.png"] == "Small left pleural effusion."
    images = np.stack([np.asarray(Image.open(out / n)) for n in names[:4]])
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    grid = np.asarray(Image.open(out / "grid.png"))  # a row per prompt
    assert grid.shape == (64, 64, 3)
    np.testing.assert_array_equal(grid[32:, 32:], images[3])

    def features(x):  # 4x4 average-pooled pixels: a cheap stand-in for Inception features
        return x.reshape(len(x), 4, 8, 4, 8, 3).mean(axis=(2, 4)).reshape(len(x), -1)

    real = np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32)), np.float32)
                     for p in sorted((lora_run.parent / "images").glob("*/*.png"))]) / 127.5 - 1
    fake = images / 127.5 - 1
    value = fid([real], [fake], features)
    assert fid([real], [real], features) == pytest.approx(0.0, abs=1e-6)  # a set is at distance 0 of itself
    assert value == pytest.approx(fid([fake], [real], features), rel=1e-6)  # symmetric (to float64 eigh rounding)
    assert value > 1e-3


def test_generate_refuses_an_adapter_of_another_base_or_method_config(tiny_pipeline, lora_run, tmp_path):
    other = tmp_path / "other_base"
    shutil.copytree(tiny_pipeline, other)
    weights = other / "unet" / "diffusion_pytorch_model.safetensors"
    arrays = load_file(str(weights))
    arrays["conv_in.bias"] = arrays["conv_in.bias"] + 1e-3
    save_file(arrays, str(weights))
    with pytest.raises(ValueError, match="different base weights"):
        sample.generate(other, ["x"], tmp_path / "out", adapter=lora_run / "adapter")

    adapter = tmp_path / "adapter"
    shutil.copytree(lora_run / "adapter", adapter)
    meta = json.loads((adapter / "adapter_config.json").read_text())
    meta["peft"]["rank"] = 8
    (adapter / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not fit this model.*shape mismatches"):
        sample.generate(tiny_pipeline, ["x"], tmp_path / "out", adapter=adapter)
    del meta["base_hash"]
    (adapter / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="train_t2i adapter folder"):
        sample.generate(tiny_pipeline, ["x"], tmp_path / "out", adapter=adapter)
    assert not (tmp_path / "out").exists()


def test_diffusers_lora_export_gives_our_unet_output(tiny_pipeline, lora_run):
    """StableDiffusionPipeline.load_lora_weights = lora_state_dict + load_lora_into_unet, run here on the U-Net."""
    adapter = lora_run / "adapter"
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet")
    state_dict, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(adapter / "diffusers")
    assert all(k.startswith("unet.") and ".lora_" in k for k in state_dict)
    diffusers.StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet=unet)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 4), dtype=np.float32)
    t = np.array([10, 700])
    context = rng.standard_normal((2, 9, 32), dtype=np.float32)
    with torch.no_grad():
        def torch_out():
            return unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                        torch.from_numpy(context)).sample.permute(0, 2, 3, 1).numpy()

        adapted = torch_out()
        unet.disable_adapters()
        base = torch_out()

    ours = from_pretrained("unet2d_condition", tiny_pipeline)
    peft_cfg = ml_collections.ConfigDict(read_adapter_config(adapter)["peft"])
    apply_peft(ours, peft_cfg)
    load_adapter(ours, adapter, trainable_filter(peft_cfg), base_hash=None)
    unmerged = np.asarray(ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(context)))
    merged = np.asarray(merge(ours, peft_cfg)(jnp.asarray(x), jnp.asarray(t), jnp.asarray(context)))
    assert np.abs(adapted - base).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(unmerged, adapted, rtol=0, atol=1e-4)
    np.testing.assert_allclose(merged, adapted, rtol=0, atol=1e-4)
