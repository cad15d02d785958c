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
