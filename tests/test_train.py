"""End-to-end training: launch/train.py on real MedMNIST data, resuming, sharding, dry runs."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from peft_jax import sharding as shd
from peft_jax.config import base_config
from peft_jax.train import builder, classify, step as step_lib
from peft_jax.train.state import setup

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config.model.name=vit_ti16", "--config.model.image_size=28", "--config.model.patch_size=4",
        "--config.model.depth=2", "--config.dataset.name=breastmnist", "--config.train.batch_size=16",
        "--config.train.progress=False"]


def train_cmd(workdir, *extra, config="configs/vit_b_lora.py"):
    return [sys.executable, str(ROOT / "launch" / "train.py"), f"--config={ROOT / config}", *TINY, *extra,
            f"--workdir={workdir}"]


def run(cmd, **kw):
    env = dict(os.environ, PEFT_JAX_TCMALLOC="0")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **kw)


def test_train_writes_results_and_resumes_after_kill(shared_data, tmp_path):
    steps = ["--config.train.num_steps=40", "--config.train.checkpoint_every=5", "--config.train.eval_every=10"]
    # Uninterrupted reference run.
    ref = run(train_cmd(tmp_path / "ref", *steps))
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = json.loads((tmp_path / "ref" / "results.json").read_text())

    # Same run, killed with SIGKILL once a checkpoint exists, then rerun with the same command.
    workdir = tmp_path / "killed"
    env = dict(os.environ, PEFT_JAX_TCMALLOC="0")
    proc = subprocess.Popen(train_cmd(workdir, *steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    latest = workdir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.is_dir() and any(p.name.isdigit() and int(p.name) >= 10 for p in latest.iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "results.json").exists()
    rerun = run(train_cmd(workdir, *steps))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "[resume]" in rerun.stdout + rerun.stderr
    got = json.loads((workdir / "results.json").read_text())

    assert got["trainable_params"] == 2 * 2 * (192 * 8 + 8 * 192) + 192 * 2 + 2  # LoRA r8 q,v, 2 blocks, head
    for key in ("method", "model", "dataset", "data_fraction", "seed", "trainable_params", "total_params",
                "trainable_percent", "best_step", "val", "test"):
        assert key in got
    for key in ("macro_f1", "accuracy", "balanced_accuracy", "auroc", "ece"):
        assert got["test"][key] == pytest.approx(expected["test"][key], abs=1e-6)
    assert (workdir / "adapter" / "adapter.safetensors").is_file()
    assert (workdir / "adapter" / "adapter_config.json").is_file()
    assert any((workdir / "tb").iterdir())


def test_workdir_of_another_experiment_is_refused(shared_data, tmp_path):
    first = run(train_cmd(tmp_path, "--config.train.num_steps=2", "--config.train.eval_every=2"))
    assert first.returncode == 0, first.stderr[-2000:]
    other = run(train_cmd(tmp_path, "--config.train.num_steps=2", "--config.peft.method=ssf"))
    assert other.returncode == 2
    assert "holds checkpoints of a different experiment" in other.stderr
    assert "peft.method: 'lora' there vs 'ssf' now" in other.stderr


def test_unknown_config_key_is_an_error(tmp_path):
    bad = run(train_cmd(tmp_path, "--config.peft.rnak=4"))
    assert bad.returncode != 0
    assert "rnak" in bad.stderr
    assert not (tmp_path / "results.json").exists()


def test_loss_falls_on_real_data(shared_data, tmp_path):
    cfg = base_config()
    cfg.model.name, cfg.model.image_size, cfg.model.patch_size, cfg.model.depth = "vit_ti16", 28, 4, 2
    cfg.dataset.name = "pneumoniamnist"
    cfg.peft.method = "lora"
    cfg.train.update(num_steps=60, batch_size=32, eval_every=60, log_every=1, lr=3e-3, warmup_steps=5, progress=False)
    classify.train_and_evaluate(cfg, tmp_path)
    hist = json.loads((tmp_path / "results.json").read_text())
    assert hist["test"]["macro_f1"] > 0.6  # pneumonia vs normal after 60 LoRA steps from scratch


def losses_on_mesh(data, fsdp, steps=6):
    cfg = base_config()
    cfg.model.name, cfg.model.image_size, cfg.model.patch_size, cfg.model.depth = "vit_ti16", 32, 8, 2
    cfg.peft.method = "lora"
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.min_shard_size = data, fsdp, 1
    cfg.train.update(lr=1e-2, warmup_steps=0, num_steps=steps)
    built = builder.build(cfg, 2)
    state = setup(cfg, built.model, built.trainable, shd.make_mesh(cfg.mesh))
    train_step = step_lib.compile_steps(state, cfg.train).train
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
             "label": rng.integers(0, 2, size=8).astype(np.int32)}
    batch = jax.device_put(batch, state.batch_sharding)
    # one batch, memorised: the loss must fall
    losses = [float(state.advance(train_step, batch)["loss"]) for _ in range(steps)]
    return np.array(losses), state.frozen


def test_sharded_training_matches_single_device():
    assert jax.device_count() >= 8, "conftest sets 8 simulated CPU devices"
    single, _ = losses_on_mesh(1, 1)
    sharded, frozen = losses_on_mesh(2, 4)
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)
    assert single[-1] < single[0]
    kernel = frozen["blocks"][0]["mlp"]["fc1"]["kernel"].get_value()
    assert len(kernel.sharding.device_set) == 8 and kernel.addressable_shards[0].data.shape != kernel.shape


def test_vit_h_dry_run_on_8_devices(tmp_path):
    env = dict(os.environ, PEFT_JAX_TCMALLOC="0", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), f"--config={ROOT / 'configs/vit_h_lora.py'}",
                          "--config.mesh.fsdp=8", "--config.dry_run=True", f"--workdir={tmp_path}"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "dry_run.json").read_text())
    assert result["trainable_params"] == 1_313_282  # 32 x 2 x (1280x8 + 8x1280) + 1280x2 + 2
    assert result["num_devices"] == 8
    ratio = result["frozen_bytes_per_device"] / (result["frozen_bytes_total"] / 8)
    assert 1.0 <= ratio < 1.1
    assert result["memory_analysis"]["argument_size_in_bytes"] < result["frozen_bytes_total"] / 4
