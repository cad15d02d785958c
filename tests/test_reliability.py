"""Reliability: preemption, multi-process runs, determinism, numerical faults and bad input.

Every bad-input case must end with a non-zero exit, an error naming the problem and the
fix, and no output left behind that looks like a finished run.
"""
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from peft_jax.config import base_config
from peft_jax.train import classify

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
TINY = ["--config.model.name=vit_ti16", "--config.model.image_size=28", "--config.model.patch_size=4",
        "--config.model.depth=2", "--config.dataset.name=breastmnist", "--config.train.batch_size=16",
        "--config.train.progress=False"]


def cmd(workdir, *extra, config="configs/vit_b_lora.py"):
    return [sys.executable, TRAIN, f"--config={ROOT / config}", *TINY, *extra, f"--workdir={workdir}"]


def env(**kw):
    return dict(os.environ, PEFT_JAX_TCMALLOC="0", **kw)


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, env=kw.pop("env", env()), timeout=600, **kw)


def wait_for_checkpoint(workdir, at_least, proc, timeout=300):
    latest = workdir / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if latest.is_dir() and any(p.name.isdigit() and int(p.name) >= at_least for p in latest.iterdir()):
            return
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared before the run ended")


def test_sigterm_saves_and_exits_then_resumes(shared_data, tmp_path):
    args = cmd(tmp_path, "--config.train.num_steps=400", "--config.train.checkpoint_every=5",
               "--config.train.eval_every=400")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    wait_for_checkpoint(tmp_path, 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "[preempted] SIGTERM at step" in err
    saved = max(int(p.name) for p in (tmp_path / "checkpoints" / "latest").iterdir() if p.name.isdigit())
    assert saved >= 5
    assert not (tmp_path / "results.json").exists()
    again = run(args[:-1] + ["--config.train.num_steps=%d" % (saved + 5), f"--workdir={tmp_path}"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"continuing from step {saved}" in again.stdout + again.stderr
    assert json.loads((tmp_path / "results.json").read_text())["steps_run"] == saved + 5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(workdir):
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(shared_data, tmp_path):
    common = ["--config.train.num_steps=4", "--config.train.eval_every=4", "--config.train.log_every=1",
              "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.mesh.min_shard_size=1"]
    one = run(cmd(tmp_path / "one", *common), env=env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert one.returncode == 0, one.stderr[-2000:]
    port = free_port()
    procs = [subprocess.Popen(
        cmd(tmp_path / "two", *common, "--config.distributed.enabled=True",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env(XLA_FLAGS="--xla_force_host_platform_device_count=4")) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    assert len(losses(tmp_path / "one")) == 4


def tiny_config():
    cfg = base_config()
    cfg.model.name, cfg.model.image_size, cfg.model.patch_size, cfg.model.depth = "vit_ti16", 28, 4, 2
    cfg.train.update(num_steps=12, batch_size=16, eval_every=6, progress=False)
    return cfg


def test_same_seed_same_metrics(shared_data, tmp_path):
    a = classify.train_and_evaluate(tiny_config(), tmp_path / "a")
    b = classify.train_and_evaluate(tiny_config(), tmp_path / "b")
    assert a["test"] == b["test"] and a["val"] == b["val"]


def test_nonfinite_loss_stops_or_is_skipped(shared_data, tmp_path):
    blowup = ["--config.train.lr=1e38", "--config.train.num_steps=6", "--config.train.eval_every=3",
              "--config.train.grad_clip=0"]
    out = run(cmd(tmp_path / "stop", *blowup))
    assert out.returncode == 2
    assert "non-finite loss or gradient" in out.stderr and "at step" in out.stderr
    assert "train.skip_nonfinite=True" in out.stderr
    assert not (tmp_path / "stop" / "results.json").exists()
    assert not (tmp_path / "stop" / "checkpoints" / "best").exists() or not any(
        (tmp_path / "stop" / "checkpoints" / "best").iterdir())

    out = run(cmd(tmp_path / "skip", *blowup, "--config.train.skip_nonfinite=True"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "skip" / "results.json").read_text())["skipped_nonfinite_steps"] > 0


def corrupt_busi(tmp_path, shared_data):
    manual = tmp_path / "busi_manual"
    shutil.copytree(shared_data / "busi", manual / "Dataset_BUSI_with_GT", ignore=shutil.ignore_patterns("*.csv"))
    victim = next((manual / "Dataset_BUSI_with_GT" / "benign").glob("*.png"))
    victim.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return manual, victim.name


BAD = {
    "unknown key": (["--config.peft.rnak=4"], ["rnak", "rank"]),
    "unknown method": (["--config.peft.method=lorra"], ["unknown PEFT method", "Did you mean lora", "Valid names"]),
    "unknown model": (["--config.model.name=vit_b61"], ["unknown model", "vit_b16"]),
    "unknown dataset": (["--config.dataset.name=breastmnst"], ["breastmnst", "breastmnist"]),
    "rank 0": (["--config.peft.rank=0"], ["peft.rank must be a positive integer"]),
    "fraction 0": (["--config.dataset.fraction=0.0"], ["dataset.fraction"]),
    "fraction above 1": (["--config.dataset.fraction=1.5"], ["dataset.fraction"]),
    "batch not divisible": (["--config.mesh.data=8", "--config.train.batch_size=12"],
                            ["train.batch_size=12 is not divisible by the 8 devices"]),
    "missing dataset dir": (["--config.dataset.name=busi", "--config.dataset.manual_dir=/nonexistent/busi"],
                            ["busi", "/nonexistent/busi"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_cleanly(case, tmp_path, shared_data):
    extra, expected = BAD[case]
    out = run(cmd(tmp_path / "w", *extra, f"--config.dataset.data_dir={tmp_path / 'prepared'}"
                  if "dataset.name=busi" in " ".join(extra) else "--config.seed=0"),
              env=env(XLA_FLAGS="--xla_force_host_platform_device_count=8", PEFT_JAX_CACHE=str(tmp_path / "cache")))
    assert out.returncode != 0
    for text in expected:
        assert text in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "w" / "results.json").exists() and not (tmp_path / "w" / "config.json").exists()


def test_corrupt_image_is_named(tmp_path, shared_data):
    manual, name = corrupt_busi(tmp_path, shared_data)
    args = ["--config.dataset.name=busi", f"--config.dataset.manual_dir={manual}",
            f"--config.dataset.data_dir={tmp_path / 'prepared'}"]
    out = run(cmd(tmp_path / "w", *args), env=env(PEFT_JAX_CACHE=str(tmp_path / "cache")))
    assert out.returncode != 0
    assert name in out.stderr and "skip_bad_files" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "w" / "results.json").exists()


def test_checkpoint_of_another_architecture_is_refused(tmp_path, shared_data):
    pre = run(cmd(tmp_path / "pre", "--config.peft.method=full", "--config.train.num_steps=2",
                  "--config.train.eval_every=2"))
    assert pre.returncode == 0, pre.stderr[-2000:]
    out = run(cmd(tmp_path / "w", f"--config.init.checkpoint={tmp_path / 'pre' / 'adapter'}",
                  "--config.model.patch_size=7"))
    assert out.returncode == 2
    assert "patch_embed/kernel" in out.stderr and "shape" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "w" / "results.json").exists() and not (tmp_path / "w" / "config.json").exists()


class _Payload:
    """Unpickling this would create a marker file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    torch = pytest.importorskip("torch")
    from peft_jax.models import from_pretrained

    marker = tmp_path / "pwned"
    evil = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "x": _Payload(marker)}, evil)
    with pytest.raises(Exception):
        from_pretrained("resnet18", evil)
    assert not marker.exists()
