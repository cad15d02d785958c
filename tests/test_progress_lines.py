"""Without a terminal the progress bar writes one plain line per logged step, with the best score so far."""
import re

from peft_jax.config import base_config, tiny_run, with_values
from peft_jax.train import classify


def test_log_file_gets_one_line_per_logged_step_with_the_current_best(shared_data, tmp_path, capsys):
    cfg = base_config()
    tiny_run(cfg)
    cfg = with_values(cfg, {"model.name": "vit_ti16", "model.image_size": 28, "model.patch_size": 4,
                            "model.depth": 1, "peft.method": "linear", "train.num_steps": 8,
                            "train.eval_every": 4, "train.log_every": 2, "train.progress": True})
    result = classify.train_and_evaluate(cfg, tmp_path)
    lines = [line for line in capsys.readouterr().err.splitlines() if "linear on breastmnist: step" in line]
    steps = [int(re.search(r"step (\d+)/8", line).group(1)) for line in lines]
    assert set(steps) == {2, 4, 6, 8} and steps == sorted(steps) and len(steps) <= 6  # + one per new best
    assert "\r" not in "".join(lines) and lines[0].endswith("best_f1 -")
    assert lines[-1].endswith(f"best_f1 {result['val']['macro_f1']:.3f}")  # the best validation score


def test_start_up_line_names_each_phase(monkeypatch):
    from peft_jax.train import startup

    now = [100.0]
    monkeypatch.setattr(startup.time, "time", lambda: now[0])
    monkeypatch.setattr(startup, "process_seconds", lambda: 6.0)
    monkeypatch.setattr(startup, "_FIRST_RUN", [True])
    clock = startup.StartupClock()
    for phase, seconds in (("data", 1.0), ("model", 2.5), ("first batch and compilation", 4.0)):
        now[0] += seconds
        clock.mark(phase)
    assert clock.line() == ("[start-up] ready to train after 13.5 s: imports and config 6.0 s, data 1.0 s, "
                            "model 2.5 s, first batch and compilation 4.0 s")
    assert "imports" not in startup.StartupClock().line()  # a second run of the process has no import time


def test_process_seconds_counts_from_the_process_start():
    import subprocess
    import sys

    code = "import time; time.sleep(1.5); from peft_jax.train import startup; print(startup.process_seconds())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    if out == "None":
        import pytest
        pytest.skip("no /proc on this platform")
    assert 1.5 <= float(out) < 60  # the sleep and the import, counted from the process's own start
