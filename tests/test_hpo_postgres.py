"""One ASHA study in a real PostgreSQL server, shared by two launch/sweep.py processes (as two hosts would).

The test starts its own server (Debian's ``postgresql`` package; .ci/run installs it) on
127.0.0.1 and a free port, in a temporary folder owned by the ``postgres`` user when it runs
as root, and skips with the reason when it cannot.
"""
import glob
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

optuna = pytest.importorskip("optuna", reason="the hpo extra: pip install -e '.[hpo]'")
pytest.importorskip("psycopg2", reason="the hpo extra's PostgreSQL driver: pip install -e '.[hpo]'")
from optuna.trial import TrialState  # noqa: E402

from peft_jax.hpo import sweep as sweep_lib  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = """
from peft_jax import hpo
from peft_jax.config import base_config, with_values

def get_config():
    c = with_values(base_config(), {TINY!r})
    c.sweep = hpo.sweep_section(num_trials=3, min_resource=5, max_resource=10,
                                space={{"common": "train.lr=choice(0.001, 0.0)"}})
    c.sweep.study_name = "shared"
    return c
"""
TINY = {"model.name": "vit_ti16", "model.image_size": 28, "model.patch_size": 4, "model.depth": 1,
        "peft.method": "full", "dataset.name": "breastmnist", "train.batch_size": 16, "train.warmup_steps": 2,
        "train.lr": 1e-3, "train.patience": 0, "train.eval_every": 5, "train.checkpoint_every": 5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL server; yields its SQLAlchemy URL."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    bindir = pathlib.Path(bins[-1]).parent
    as_user = []
    data = pathlib.Path(tempfile.mkdtemp(prefix="peft_jax_pg_"))
    if os.geteuid() == 0:  # postgres refuses to run as root
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            pytest.skip("running as root without a 'postgres' user and runuser to start PostgreSQL as")
        shutil.chown(data, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    db = data / "db"
    init = subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(db), "-U", "postgres", "--auth=trust"],
                          capture_output=True, text=True)
    if init.returncode:
        shutil.rmtree(data, ignore_errors=True)
        pytest.skip(f"initdb failed: {init.stderr.strip()[-300:]}")
    options = f"-p {port} -c listen_addresses=127.0.0.1 -k {data} -c fsync=off"
    start = subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(db), "-o", options, "-l",
                            str(data / "log"), "-w", "-t", "30", "start"], capture_output=True, text=True)
    if start.returncode:
        log = (data / "log").read_text()[-300:] if (data / "log").exists() else start.stderr
        shutil.rmtree(data, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {log.strip()}")
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(db), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def _sweep(config: pathlib.Path, workdir: pathlib.Path, url: str, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "launch" / "sweep.py"), f"--config={config}", f"--workdir={workdir}",
           f"--config.sweep.storage={url}", "--workers=1"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def _wait_for(predicate, timeout: float, what: str):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (value := predicate()) is not None:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_two_sweep_processes_share_one_postgres_study(postgres, shared_data, tmp_path):
    config = tmp_path / "sweep_config.py"
    config.write_text(CONFIG.format(TINY=TINY))
    env = dict(os.environ, PEFT_JAX_TCMALLOC="0", PEFT_JAX_DATA=str(shared_data))
    spec = importlib.util.spec_from_file_location("sweep_config", config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    study_cfg = module.get_config()
    study_cfg.sweep.storage = postgres
    study = sweep_lib.open_study(study_cfg, tmp_path)
    for lr in (1e-3, 0.0, 0.0):  # the good trial first, so that ASHA's rung at step 5 prunes the lr=0 ones
        study.enqueue_trial({"train.lr": lr})

    # Host A takes trial 0 and dies (SIGKILL, its worker too) once that trial reported its first rung.
    a = _sweep(config, tmp_path / "host_a", postgres, env)
    trial0 = _wait_for(lambda: next((t for t in study.get_trials(states=(TrialState.RUNNING,))
                                     if "completed_rung_0" in t.system_attrs), None), 120, "trial 0's first rung")
    os.killpg(a.pid, signal.SIGKILL)
    os.kill(trial0.user_attrs["pid"], signal.SIGKILL)
    a.wait()
    assert trial0.number == 0 and study.get_trials()[0].state == TrialState.RUNNING

    # Host B joins while host A restarts: one of them marks the dead trial failed and retries it once.
    b = _sweep(config, tmp_path / "host_b", postgres, env)
    a2 = _sweep(config, tmp_path / "host_a", postgres, env)
    outputs = {p: p.communicate(timeout=300)[0] for p in (b, a2)}
    assert sum("1 interrupted trial(s) will continue" in o for o in outputs.values()) == 1, outputs
    for p, out in outputs.items():  # a host that ends while the other still trains has no finished trial yet
        assert p.returncode == 0 or (p.returncode == 1 and "no trial finished" in out), out[-3000:]

    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.PRUNED, TrialState.PRUNED, TrialState.COMPLETE]
    assert trials[3].user_attrs["resume_of"] == 0 and trials[3].params == {"train.lr": 1e-3}
    # Every trial ran once, in one host's folder; host B ran some of them.
    folders = [pathlib.Path(t.user_attrs["workdir"]) for t in trials]
    assert len(set(folders[:3])) == 3 and {f.parents[1].name for f in folders} == {"host_a", "host_b"}
    assert folders[3].name == "0000"  # the retry runs in trial 0's folder (continuing it on host A)
    # The lr=0 trials were pruned at the first rung against trial 0's report from the killed host.
    assert all(t.last_step == 5 for t in trials[1:3])
    assert trials[0].system_attrs["completed_rung_0"] > max(t.intermediate_values[5] for t in trials[1:3])
    assert (folders[3] / "results.json").is_file()
    summary = json.loads((tmp_path / "host_a" / "sweep_results.json").read_text())
    assert summary["storage"] == postgres and summary["trials"]["interrupted_and_retried"] == 1
