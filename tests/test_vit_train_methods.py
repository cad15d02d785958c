"""Every ViT method trains on real data (BreastMNIST) through the train loop behind launch/train.py,
with its default hyper-parameters (adapter dropout included): the training loss falls, the
method's own variables move, and the adapter folder reproduces the run."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from peft_jax import data as data_lib
from peft_jax.adapters import METHODS
from peft_jax.adapters.io import load_adapter
from peft_jax.config import base_config
from peft_jax.train import builder, classify
from peft_jax.testing import train_losses

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Every registered ViT method on its own but the two without a body (each run checks that every one of its
# variables trained).
RUNS = sorted(name for name, m in METHODS.items() if "vit" in m.archs and name not in ("linear", "full"))
TINY = dict(name="vit_ti16", image_size=28, patch_size=4, depth=2)


def tiny_experiment(method: str):
    c = base_config()
    c.model.update(TINY)
    c.dataset.name = "breastmnist"
    c.peft.method = method
    c.train.update(num_steps=20, batch_size=16, lr=3e-3, warmup_steps=2, log_every=1, eval_every=20, progress=False)
    return c


def assert_loss_falls(losses: list[float]) -> None:
    """The mean loss of the last 5 steps is clearly below that of the first 5 (a run whose updates do nothing,
    or go the wrong way, stays level or rises)."""
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.95 * first, losses


@pytest.mark.parametrize("method", RUNS)
def test_methods_train_on_breastmnist(shared_data, tmp_path, method):
    cfg = tiny_experiment(method)
    results = classify.train_and_evaluate(cfg, tmp_path)
    losses = train_losses(tmp_path)
    assert len(losses) == 20
    assert_loss_falls(losses)
    # The method's own variables moved (not only the head): compare the adapter file with the initial model.
    built = builder.build(cfg, 2)
    initial, initial_filter = built.model, built.trainable
    trained = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    init_state = {f"params/{'/'.join(map(str, p))}": np.asarray(v.get_value())
                  for p, v in nnx.to_flat_state(nnx.state(initial, initial_filter))}
    body = [k for k in trained if k.startswith("params/") and not k.startswith("params/head/")]
    assert body and set(body) <= set(init_state)
    moved = [k for k in body if not np.array_equal(trained[k], init_state[k])]
    assert moved == body, sorted(set(body) - set(moved))
    assert results["trainable_params"] == json.loads((tmp_path / "results.json").read_text())["trainable_params"]


def test_combination_through_the_command_line(shared_data, tmp_path):
    """launch/train.py itself, with two methods combined; its adapter folder reproduces the run."""
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), f"--config={ROOT / 'configs' / 'vit_b_lora.py'}",
           *(f"--config.model.{k}={v}" for k, v in TINY.items()), "--config.dataset.name=breastmnist",
           "--config.peft.method=adaptformer+ln_tune", "--config.train.num_steps=20", "--config.train.batch_size=16",
           "--config.train.lr=3e-3", "--config.train.warmup_steps=2", "--config.train.log_every=1",
           "--config.train.progress=False", f"--workdir={tmp_path}"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, PEFT_JAX_TCMALLOC="0"))
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["method"] == "adaptformer+ln_tune"
    # ViT-Ti/16 depth 2: AdaptFormer b64 (192x64 + 64 + 64x192 + 192 per block), LayerNorms (5 x 2 x 192), head
    assert results["trainable_params"] == 2 * (192 * 64 + 64 + 64 * 192 + 192) + 5 * 2 * 192 + 192 * 2 + 2
    assert_loss_falls(train_losses(tmp_path))
    # The adapter folder on a freshly built backbone reproduces the run's test accuracy.
    cfg = tiny_experiment("adaptformer+ln_tune")
    built = builder.build(cfg, 2)
    load_adapter(built.model, tmp_path / "adapter", built.trainable, base_hash=built.base_hash, peft_config=cfg.peft)
    built.model.eval()
    data = data_lib.load_dataset(cfg.dataset, seed=cfg.seed)
    logits, labels = [], []
    for batch in data_lib.eval_batches(data.test, batch_size=128, image_size=28):
        logits.append(np.asarray(built.model(batch["image"]))[batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
    accuracy = float((np.concatenate(logits).argmax(-1) == np.concatenate(labels)).mean())
    assert accuracy == pytest.approx(results["test"]["accuracy"], abs=1e-9)
