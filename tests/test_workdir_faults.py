"""Workdir faults (issue 17): whatever is killed, filled, deleted or corrupted, a rerun either finishes with
the uninterrupted run's test metrics or stops with one error naming the folder to delete.

Runs are in-process and tiny (ViT-Ti depth 1 at 28 px on BreastMNIST, 10 steps): after the first run the
compiled steps come from a persistent compilation cache, so each further run costs about 3 s.
"""
import errno
import json
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import orbax.checkpoint as ocp
import pytest

from peft_jax.adapters.io import save_adapter
from peft_jax.config import base_config
from peft_jax.train import builder, classify, workdir as workdir_lib
from peft_jax.train.workdir import Workdir, WorkdirError

ROOT = pathlib.Path(__file__).resolve().parents[1]
# latest every 2 steps, best at the evaluations 5 and 10: step 5 has the best save, then the latest save.
STEPS = {"num_steps": 10, "eval_every": 5, "checkpoint_every": 2, "log_every": 5}
CLI = ["--config.model.name=vit_ti16", "--config.model.image_size=28", "--config.model.patch_size=4",
       "--config.model.depth=1", "--config.dataset.name=breastmnist", "--config.train.batch_size=16",
       "--config.train.progress=False", *(f"--config.train.{k}={v}" for k, v in STEPS.items())]


def tiny(**train):
    cfg = base_config()
    cfg.model.name, cfg.model.image_size, cfg.model.patch_size, cfg.model.depth = "vit_ti16", 28, 4, 1
    cfg.train.update(**{"batch_size": 16, "progress": False, **STEPS, **train})
    return cfg


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Every run here compiles the same three steps: compile them once."""
    from jax._src import compilation_cache as cc

    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    cc.reset_cache()


@pytest.fixture(scope="module")
def reference(shared_data, tmp_path_factory):
    """The uninterrupted run's test metrics."""
    return classify.train_and_evaluate(tiny(), tmp_path_factory.mktemp("ref") / "w")["test"]


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs (not even ``except Exception`` handlers)."""


def fail_at(monkeypatch, when, error):
    """Makes ``Workdir.save`` raise ``error`` instead of the save ``when(name, step)`` selects."""
    real = Workdir.save

    def save(self, name, step, state, meta):
        if when(name, step):
            raise error
        return real(self, name, step, state, meta)

    monkeypatch.setattr(Workdir, "save", save)


def steps(folder):
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def test_kill_between_best_and_latest_saves(reference, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as m:
        fail_at(m, lambda name, step: (name, step) == ("latest", 5), Killed())
        with pytest.raises(Killed):
            classify.train_and_evaluate(tiny(), tmp_path)
    assert steps(tmp_path / "checkpoints" / "best") == [5] and steps(tmp_path / "checkpoints" / "latest") == [4]
    for _ in range(2):  # the first rerun finishes, the second reuses the finished run
        assert classify.train_and_evaluate(tiny(), tmp_path)["test"] == reference
    assert "continuing from step 5 of checkpoints/best" in capsys.readouterr().out


def test_full_disk_at_random_saves(reference, tmp_path, monkeypatch):
    """A checkpoint write failing with ENOSPC at the Nth orbax save (5 random N), then a rerun with space."""
    real, total = ocp.CheckpointManager.save, 8  # latest 2, 4, 5, 6, 8, 10 and best 5 (and 10 if better)
    for trial, nth in enumerate(random.Random(17).sample(range(1, total + 1), 5)):
        calls = {"n": 0}

        def save(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == nth:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(self, *args, **kwargs)

        workdir = tmp_path / str(trial)
        with monkeypatch.context() as m:
            m.setattr(ocp.CheckpointManager, "save", save)
            try:
                classify.train_and_evaluate(tiny(), workdir)
            except WorkdirError as e:
                assert "No space left on device" in str(e) and str(workdir / "checkpoints") in str(e)
        assert classify.train_and_evaluate(tiny(), workdir)["test"] == reference, nth


def mounted_tmpfs(path, size):
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")


def test_real_full_disk_then_space(reference, tmp_path):
    """A tmpfs too small for the run (5 random sizes, so the disk fills at different writes); then grown."""
    disk = tmp_path / "disk"
    mounted_tmpfs(disk, "64k")
    try:
        for trial, size in enumerate(random.Random(3).sample(range(96, 640, 8), 5)):
            subprocess.run(["mount", "-o", f"remount,size={size}k", str(disk)], check=True)
            workdir = disk / str(trial)
            try:
                classify.train_and_evaluate(tiny(), workdir)
            except WorkdirError as e:
                assert "No space left on device" in str(e) and str(workdir) in str(e), str(e)
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
            assert classify.train_and_evaluate(tiny(), workdir)["test"] == reference, size
            shutil.rmtree(workdir)
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def stopped_run(workdir, monkeypatch, cfg=None):
    """A run that dies just before saving latest/8 (latest at 6, best at 5)."""
    with monkeypatch.context() as m:
        fail_at(m, lambda name, step: (name, step) == ("latest", 8), Killed())
        with pytest.raises(Killed):
            classify.train_and_evaluate(cfg or tiny(), workdir)


def test_latest_deleted(reference, tmp_path, monkeypatch):
    stopped_run(tmp_path, monkeypatch)
    shutil.rmtree(tmp_path / "checkpoints" / "latest")
    assert classify.train_and_evaluate(tiny(), tmp_path)["test"] == reference


def test_best_deleted(reference, tmp_path, monkeypatch, capsys):
    stopped_run(tmp_path, monkeypatch)
    shutil.rmtree(tmp_path / "checkpoints" / "best")
    assert classify.train_and_evaluate(tiny(), tmp_path)["test"] == reference
    assert "starting over from step 0" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "checkpoints" / "best")  # a finished run: best at 5 or 10 is rebuilt the same way
    assert classify.train_and_evaluate(tiny(), tmp_path)["test"] == reference


def truncate_largest(folder):
    victim = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])


@pytest.mark.parametrize("part", ["state", "meta"])
def test_corrupted_latest_names_the_folder(reference, tmp_path, monkeypatch, part):
    stopped_run(tmp_path, monkeypatch)
    folder = tmp_path / "checkpoints" / "latest" / "6"
    truncate_largest(folder / part)
    with pytest.raises(WorkdirError, match=f"checkpoint {folder} cannot be read .*delete that folder"):
        classify.train_and_evaluate(tiny(), tmp_path)
    shutil.rmtree(folder)
    assert classify.train_and_evaluate(tiny(), tmp_path)["test"] == reference


def native_checkpoint(folder, seed):
    """A peft_jax ``full`` run's folder with random (seeded) weights: an ``init.checkpoint``."""
    cfg = tiny()
    cfg.peft.method, cfg.seed = "full", seed
    built = builder.build(cfg, 2)
    save_adapter(folder, built.model, built.trainable, config=cfg, base_hash=built.base_hash)


def test_other_base_weights_are_refused(shared_data, tmp_path, monkeypatch):
    native_checkpoint(tmp_path / "base", seed=1)
    cfg = tiny()
    cfg.init.checkpoint = str(tmp_path / "base")
    stopped_run(tmp_path / "w", monkeypatch, cfg)
    shutil.rmtree(tmp_path / "base")
    native_checkpoint(tmp_path / "base", seed=2)  # the same path, other weights
    with pytest.raises(WorkdirError, match=r"trained on other base weights .*init.checkpoint"):
        classify.train_and_evaluate(cfg, tmp_path / "w")


def test_lost_config_json_still_refuses_another_experiment(shared_data, tmp_path, monkeypatch):
    stopped_run(tmp_path, monkeypatch)
    (tmp_path / "config.json").unlink()
    with pytest.raises(WorkdirError, match=r"checkpoint .*latest/6 belongs to a different experiment .*train.lr"):
        classify.train_and_evaluate(tiny(lr=0.01), tmp_path)
    assert not (tmp_path / "config.json").exists()  # refused before anything was written


@pytest.mark.parametrize("field", ["batch_size", "eval_every", "checkpoint_every", "log_every", "eval_batch_size"])
def test_zero_is_refused_before_anything_is_written(tmp_path, field):
    with pytest.raises(ValueError, match=f"train.{field} must be a positive integer, got 0"):
        classify.train_and_evaluate(tiny(**{field: 0}), tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_failed_start_does_not_block_the_corrected_rerun(reference, tmp_path, monkeypatch):
    """A run that wrote config.json but died before its first checkpoint is not 'another experiment'."""
    fail_at(monkeypatch, lambda name, step: True, Killed())
    with pytest.raises(Killed):
        classify.train_and_evaluate(tiny(lr=0.5), tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "config.json").is_file()
    assert classify.train_and_evaluate(tiny(), tmp_path)["test"] == reference


BLOWUP = {"lr": 1e38, "grad_clip": 0.0}


@pytest.mark.parametrize("fix", ["lower lr", "skip_nonfinite"])
def test_nonfinite_advice_works_on_the_same_workdir(reference, tmp_path, fix, capsys):
    with pytest.raises(FloatingPointError, match="rerun on this workdir"):
        classify.train_and_evaluate(tiny(**BLOWUP), tmp_path / "w")
    assert (tmp_path / "w" / workdir_lib.NONFINITE_MARK).is_file()
    fixed = tiny() if fix == "lower lr" else tiny(**BLOWUP, skip_nonfinite=True)
    got = classify.train_and_evaluate(fixed, tmp_path / "w")
    assert "starting over from step 0" in capsys.readouterr().out
    fresh = reference if fix == "lower lr" else classify.train_and_evaluate(fixed, tmp_path / "fresh")["test"]
    assert json.dumps(got["test"], sort_keys=True) == json.dumps(fresh, sort_keys=True)  # NaN losses compare equal
    assert not (tmp_path / "w" / workdir_lib.NONFINITE_MARK).exists()


def test_nonfinite_fix_without_a_nonfinite_stop_is_another_experiment(shared_data, tmp_path, monkeypatch):
    stopped_run(tmp_path, monkeypatch)
    with pytest.raises(WorkdirError, match="different experiment .*train.lr"):
        classify.train_and_evaluate(tiny(lr=1e-4), tmp_path)


def test_unwritable_workdir_is_one_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = subprocess.run(cli(tmp_path / "file" / "w"), capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PEFT_JAX_TCMALLOC="0"))
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(tmp_path / "file") in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def one_error_line(out, folder):
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(folder) in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) <= 2, out.stderr[-2000:]


def cli_in_tmpfs(tmp_path, options):
    """launch/train.py into a fresh tmpfs remounted with ``options``."""
    disk = tmp_path / "disk"
    mounted_tmpfs(disk, "64k")
    try:
        subprocess.run(["mount", "-o", f"remount,{options}", str(disk)], check=True)
        return disk, subprocess.run(cli(disk / "w"), capture_output=True, text=True, timeout=300,
                                    env=dict(os.environ, PEFT_JAX_TCMALLOC="0"))
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_read_only_disk_is_one_error_line(shared_data, tmp_path):
    disk, out = cli_in_tmpfs(tmp_path, "ro")
    one_error_line(out, disk)
    assert "Read-only file system" in out.stderr


@pytest.mark.slow
def test_full_disk_is_one_error_line(shared_data, tmp_path):
    disk, out = cli_in_tmpfs(tmp_path, "size=120k")
    one_error_line(out, disk / "w" / "checkpoints")
    assert "No space left on device" in out.stderr


HOLDER = ("import sys, time, pathlib; from peft_jax.train.workdir import acquire_lock; "
          "acquire_lock(pathlib.Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)")


def test_a_second_process_is_refused_at_once(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.time()
        with pytest.raises(WorkdirError, match=f"in use by process {holder.pid} on host {socket.gethostname()}"):
            classify.train_and_evaluate(tiny(), tmp_path)
        assert time.time() - t0 < 5  # before the data or the model are loaded
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "config.json").exists()


def test_stale_lock_is_taken_over_and_released(reference, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / workdir_lib.LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert classify.train_and_evaluate(tiny(), tmp_path)["test"] == reference
    assert not (tmp_path / workdir_lib.LOCK_FILE).exists()


def test_live_pid_in_lock_file_is_refused(tmp_path):
    """A lock file naming a running process (another host's view, or an old-style lock) is respected."""
    (tmp_path / workdir_lib.LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(WorkdirError, match=f"in use by process {os.getppid()}"):
        classify.train_and_evaluate(tiny(), tmp_path)


def cli(workdir):
    return [sys.executable, str(ROOT / "launch" / "train.py"), f"--config={ROOT / 'configs/vit_b_lora.py'}", *CLI,
            f"--workdir={workdir}"]


@pytest.mark.slow
def test_sigkill_at_random_instants(shared_data, tmp_path):
    """launch/train.py SIGKILLed at 5 random instants of its run, each rerun to the uninterrupted test metrics."""
    env = dict(os.environ, PEFT_JAX_TCMALLOC="0")
    t0 = time.time()
    ref = subprocess.run(cli(tmp_path / "ref"), capture_output=True, text=True, env=env, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    duration, expected = time.time() - t0, json.loads((tmp_path / "ref" / "results.json").read_text())["test"]
    for trial, at in enumerate(random.Random(5).uniform(0.3, 1.0) * duration for _ in range(5)):
        workdir = tmp_path / str(trial)
        proc = subprocess.Popen(cli(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(at)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        again = subprocess.run(cli(workdir), capture_output=True, text=True, env=env, timeout=600)
        assert again.returncode == 0, (at, again.stderr[-2000:])
        assert json.loads((workdir / "results.json").read_text())["test"] == expected, at


def test_process_layout_is_not_the_experiment():
    """Every process of a multi-host run checks process 0's checkpoint meta; a relaunch may get another port."""
    one, other = base_config(), base_config()
    one.distributed.update(enabled=True, coordinator_address="127.0.0.1:1234", num_processes=2, process_id=0)
    other.distributed.update(enabled=True, coordinator_address="127.0.0.1:5678", num_processes=2, process_id=1)
    assert workdir_lib.experiment_identity(one) == workdir_lib.experiment_identity(other)
    other.train.lr = one.train.lr * 2
    assert workdir_lib.differences(workdir_lib.experiment_identity(one),
                                   workdir_lib.experiment_identity(other)) == ["train.lr"]
