"""ASHA sweeps: real (tiny) training trials on BreastMNIST, pruning, shared studies, failures, resuming."""
import json
import subprocess
import threading
import warnings

import pytest

optuna = pytest.importorskip("optuna", reason="the hpo extra: pip install -e '.[hpo]'")
from optuna.trial import TrialState  # noqa: E402

from peft_jax import hpo  # noqa: E402
from peft_jax.config import base_config, with_values  # noqa: E402
from peft_jax.hpo import space as space_lib  # noqa: E402
from peft_jax.hpo import sweep as sweep_lib  # noqa: E402

TINY = {"model.name": "vit_ti16", "model.image_size": 28, "model.patch_size": 4, "model.depth": 1,
        "peft.method": "full", "dataset.name": "breastmnist", "train.batch_size": 16, "train.warmup_steps": 2,
        "train.lr": 1e-3, "train.patience": 0}


def tiny_sweep_config(num_trials: int, space: str, min_resource: int = 5):
    cfg = with_values(base_config(), TINY)
    cfg.sweep = hpo.sweep_section(num_trials=num_trials, min_resource=min_resource, max_resource=10,
                                  space={"common": space})
    cfg.lock()
    return cfg


def test_sweep_prunes_trials_that_fall_behind(shared_data, tmp_path):
    # lr=0 leaves the random model predicting the minority class (macro-F1 0.21 at step 5); lr=1e-3 reaches the
    # majority-class 0.42 or better, so ASHA's first rung (step 5, keep the best 1/4) stops the lr=0 trials.
    cfg = tiny_sweep_config(3, "train.lr=choice(0.001, 0.0)")
    study = sweep_lib.open_study(cfg, tmp_path)
    for lr in (1e-3, 0.0, 0.0):
        study.enqueue_trial({"train.lr": lr})
    summary = sweep_lib.run_sweep(cfg, tmp_path, workers=1)

    assert summary["trials"]["finished"] == 1 and summary["trials"]["pruned"] == 2, summary["all_trials"]
    pruned = [t for t in summary["all_trials"] if t["state"] == "PRUNED"]
    assert all(t["last_step"] == 5 and t["params"] == {"train.lr": 0.0} for t in pruned)
    assert summary["best_params"] == {"train.lr": 1e-3}
    assert (tmp_path / "trials" / "0000" / "results.json").is_file()  # the finished trial is a complete run
    assert not (tmp_path / "trials" / "0001" / "results.json").exists()  # a pruned one stops before testing
    written = json.loads((tmp_path / "sweep_results.json").read_text())
    assert written["trials"]["pruned"] == 2 and written["steps_saved_by_pruning"] == 2 * (10 - 5)
    assert (tmp_path / "best_overrides.txt").read_text() == "--config.train.lr=0.001\n"


def test_rungs_stop_before_the_budget_and_the_summary_counts_saved_steps(tmp_path):
    cfg = with_values(base_config(), {"train.num_steps": 80})
    cfg.sweep = hpo.sweep_section(num_trials=3, min_resource=20, space={"common": "train.lr=log(1e-4, 1e-1)"})
    assert sweep_lib.rungs(cfg) == [20]  # 80 is the budget's end: a rung there would save nothing
    cfg.sweep.reduction_factor = 2
    assert sweep_lib.rungs(cfg) == [20, 40]
    study = optuna.create_study(direction="maximize")
    dist = {"train.lr": optuna.distributions.FloatDistribution(0.0, 1.0)}
    for state, last in ((TrialState.COMPLETE, 80), (TrialState.PRUNED, 20), (TrialState.PRUNED, 40)):
        study.add_trial(optuna.trial.create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None,
                                                  params={"train.lr": 0.1}, distributions=dist,
                                                  intermediate_values={last: 0.5}))
    summary = sweep_lib.summarize(study, tmp_path, cfg)
    assert summary["steps_saved_by_pruning"] == (80 - 20) + (80 - 40)


def test_two_workers_share_one_study_and_a_failing_trial_does_not_stop_it(shared_data, tmp_path):
    # min_resource at the budget's end: no rung, so which of the two parallel runs reports first cannot prune one
    cfg = tiny_sweep_config(3, "train.lr=log(1e-4, 1e-2); peft.method=choice(full, no_such_method)", min_resource=10)
    study = sweep_lib.open_study(cfg, tmp_path)
    study.enqueue_trial({"peft.method": "no_such_method"})  # fails while building the model
    for _ in range(2):
        study.enqueue_trial({"peft.method": "full"})
    summary = sweep_lib.run_sweep(cfg, tmp_path, workers=2)

    trials = study.get_trials()
    assert summary["trials"] == {"finished": 2, "pruned": 0, "failed": 1, "running": 0, "waiting": 0,
                                 "interrupted_and_retried": 0}
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both worker processes ran trials of the one study
    failed = next(t for t in trials if t.state == TrialState.FAIL)
    assert "no_such_method" in failed.user_attrs["error"]
    assert summary["best_params"]["peft.method"] == "full"


def test_workers_claiming_waiting_trials_at_once_never_share_one(tmp_path):
    # Optuna claims a waiting trial by read-then-write; on SQLite two workers could both claim it (found by CI:
    # two workers trained enqueued trial 0 in one folder). Four claimants with their own connections race here.
    cfg = tiny_sweep_config(40, "train.lr=log(1e-4, 1e-2)")
    study = sweep_lib.open_study(cfg, tmp_path)
    for i in range(40):
        study.enqueue_trial({"train.lr": 1e-4 * (1 + i)})
    claimed = []

    def claim_until_none_wait():
        mine = sweep_lib.open_study(cfg, tmp_path)
        while mine.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            claimed.append(mine.ask().number)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # heartbeats are meant for optimize(), not ask()
        threads = [threading.Thread(target=claim_until_none_wait) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(claimed) == len(set(claimed)), sorted(claimed)
    assert set(range(40)) <= set(claimed)


def test_interrupted_trials_are_retried_in_their_own_folder(tmp_path):
    cfg = tiny_sweep_config(2, "train.lr=log(1e-4, 1e-2)")
    study = sweep_lib.open_study(cfg, tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    trial = study.ask({"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    trial.set_user_attr("host", sweep_lib.socket.gethostname())
    trial.set_user_attr("pid", dead.pid)  # as if its sweep had been killed
    trial.report(0.5, 5)

    assert sweep_lib.fail_dead_trials(study) == 1
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].user_attrs["resume_of"] == 0
    assert waiting[0].intermediate_values == {5: 0.5}  # ASHA judges the continued run at the same rungs
    assert sweep_lib.fail_dead_trials(study) == 0
    resumed = study.ask()  # the retry: same values, same folder (so it continues that trial's checkpoints)
    assert resumed.suggest_float("train.lr", 1e-4, 1e-2, log=True) == trial.params["train.lr"]
    assert sweep_lib._trial_workdir(tmp_path, resumed) == tmp_path / "trials" / "0000"


def test_spec_parsing_and_errors():
    spec = hpo.parse_spec("train.lr=log(1e-4, 1e-1); peft.rank=choice(4, 8); peft.targets=qv; train.warmup_steps=int(0,9)")
    assert spec["train.lr"] == hpo.Dist("log", (1e-4, 1e-1))
    assert spec["peft.rank"] == hpo.Dist("choice", (4, 8))
    assert spec["peft.targets"] == "qv"
    assert spec["train.warmup_steps"] == hpo.Dist("int", (0, 9))
    with pytest.raises(ValueError, match="lower bound must be > 0"):
        hpo.parse_spec("train.lr=log(0, 1)")
    with pytest.raises(ValueError, match="write key=value"):
        hpo.parse_spec("train.lr")
    sweep = hpo.sweep_section(space={"common": "train.lr=log(1e-4, 1e-1)", "lora": "peft.rank=choice(4, 8)"})
    assert set(hpo.space_for(sweep, "lora+bitfit")) == {"train.lr", "peft.rank"}
    with pytest.raises(ValueError, match="Did you mean: train.lr"):
        with_values(base_config(), {"train.lrr": 1.0})
    with pytest.raises(ValueError, match="wrong type"):
        with_values(base_config(), {"peft.rank": "eight"})
    assert space_lib.format_flag("peft.targets", "qv") == "--config.peft.targets=qv"
