"""ASHA hyper-parameter search: an Optuna study whose trials are real training runs.

Each trial trains in its own workdir ``trials/NNNN`` (resumable) and reports its best
validation macro-F1 so far after every evaluation; Optuna's ``SuccessiveHalvingPruner``
(ASHA) stops the trials that fall behind at the rungs ``min_resource * reduction_factor**k``
steps. The study lives in a SQLite file in the sweep's workdir, or in any SQLAlchemy
database (``sweep.storage``) that several hosts share. Trials run in worker processes, so a
trial that kills its process is recorded as failed and a new worker takes over; a sweep
that was killed resumes: its interrupted trials are retried once, continuing their own
checkpoints.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import pathlib
import signal
import socket
import threading
import time
import warnings
from typing import Any

import ml_collections
import numpy as np
import optuna
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from peft_jax.config import with_values

from peft_jax.errors import UserError
from peft_jax.hpo import space as space_lib

STATES = {"finished": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL,
          "running": TrialState.RUNNING, "waiting": TrialState.WAITING}


def _retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Enqueues one repeat of a trial whose process died; it continues in the same trial folder."""
    if "resume_of" in trial.user_attrs:
        return  # a retry that died as well stays failed
    # Its reports so far come along, so ASHA judges the continued run at the same rungs.
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={"resume_of": trial.number}, intermediate_values=trial.intermediate_values))


def _sweep(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    if "sweep" not in cfg:
        raise UserError("the config has no 'sweep' section; add one with peft_jax.hpo.sweep_section(...) "
                         "(see configs/sweep_quick.py)")
    return cfg.sweep


def storage_url(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> str:
    return _sweep(cfg).storage or f"sqlite:///{(workdir / 'study.db').absolute()}"


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """TPE whose random state is drawn afresh from (seed, trial number) for every trial.

    Trial numbers are unique in a study, so resumed sweeps and parallel workers on any host
    never replay one random stream (one seed per process would repeat earlier trials' values).
    """

    def __init__(self, seed: int, **tpe_options):
        self._seed = seed
        self._options = tpe_options
        self._tpe = self._make(seed)

    def _make(self, seed: int) -> optuna.samplers.TPESampler:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # constant_liar
            return optuna.samplers.TPESampler(seed=seed, **self._options)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._tpe = self._make(int(np.random.SeedSequence([self._seed, trial.number]).generate_state(1)[0]))
        self._tpe.before_trial(study, trial)

    def reseed_rng(self) -> None:
        self._tpe.reseed_rng()

    def infer_relative_search_space(self, study, trial):
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._tpe.after_trial(study, trial, state, values)


def _take_write_lock_first(connection) -> None:
    """Starts every SQLite transaction holding the database's write lock.

    Optuna claims a waiting trial by reading that it waits and then marking it running, and
    its row lock (SELECT ... FOR UPDATE) does nothing in SQLite: two workers could both read
    "waiting" and both run the one trial in the one folder. BEGIN IMMEDIATE makes the read and
    the write one step; the other worker waits (up to the connection's timeout).
    """
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def open_study(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> optuna.Study:
    """Creates or loads the study; every worker of every host calls this with the same config."""
    sweep = _sweep(cfg)
    url = storage_url(cfg, workdir)
    sqlite = url.startswith("sqlite")
    # isolation_level=None: the driver starts no transaction of its own; _take_write_lock_first starts them.
    engine = {"connect_args": {"timeout": 120, "isolation_level": None}} if sqlite else None
    # Heartbeats let another host notice a trial whose process died; it is retried once.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(url, engine_kwargs=engine, heartbeat_interval=30, grace_period=300,
                             heartbeat_stale_trial_callback=_retry)
    if sqlite:
        sqlalchemy.event.listen(storage.engine, "begin", _take_write_lock_first)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=int(sweep.min_resource),
                                                    reduction_factor=int(sweep.reduction_factor))
    sampler = TrialSeededSampler(int(sweep.seed), constant_liar=True, n_startup_trials=max(2, int(sweep.num_trials) // 3))
    return optuna.create_study(storage=storage, study_name=sweep.study_name or workdir.absolute().name,
                               direction="maximize", pruner=pruner, sampler=sampler, load_if_exists=True)


def trial_config(cfg: ml_collections.ConfigDict, params: dict[str, Any]) -> ml_collections.ConfigDict:
    """The training config of one trial: the sweep's resource and evaluation cadence, then the sampled values."""
    sweep = _sweep(cfg)
    steps = trial_steps(cfg)
    every = int(sweep.eval_every or sweep.min_resource)
    base = with_values(space_lib.run_config(cfg), {
        "train.num_steps": steps, "train.eval_every": every, "train.progress": False}, "sweep")
    return with_values(base, params, f"sweep.space for {cfg.peft.method}")


def check_space(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The method's search space, after checking that its first point makes a valid trial config."""
    space = space_lib.space_for(_sweep(cfg), cfg.peft.method)
    trial_config(cfg, {k: v.args[0] if isinstance(v, space_lib.Dist) else v for k, v in space.items()})
    return space


def trial_steps(cfg: ml_collections.ConfigDict) -> int:
    """The training steps of a trial that is not pruned."""
    return int(_sweep(cfg).max_resource or cfg.train.num_steps)


def rungs(cfg: ml_collections.ConfigDict) -> list[int]:
    """The steps at which ASHA may stop a trial: min_resource * reduction_factor**k, before the budget's end."""
    sweep, out = _sweep(cfg), []
    step = int(sweep.min_resource)
    while step < trial_steps(cfg):
        out.append(step)
        step *= int(sweep.reduction_factor)
    return out


def _trial_workdir(workdir: pathlib.Path, trial: optuna.Trial) -> pathlib.Path:
    # A retried trial continues in the folder (and from the checkpoints) of the trial it replaces.
    return workdir / "trials" / f"{trial.user_attrs.get('resume_of', trial.number):04d}"


def _budget_left(study: optuna.Study, num_trials: int) -> bool:
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return True
    # A retry replaces the failed trial it repeats, so it does not count again.
    started = [t for t in trials if t.state != TrialState.WAITING and "resume_of" not in t.user_attrs]
    return len(started) < num_trials


def _objective(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, tag: str):
    from peft_jax.train import classify

    space = space_lib.space_for(_sweep(cfg), cfg.peft.method)
    budget = trial_steps(cfg)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = space_lib.suggest(trial, space)
        trial_dir = _trial_workdir(workdir, trial)
        trial.set_user_attr("workdir", str(trial_dir))
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        print(f"{tag} trial {trial.number} ({trial_dir.name}): {shown}", flush=True)
        best = {"f1": float("-inf")}

        def on_eval(step: int, val: dict) -> None:
            best["f1"] = max(best["f1"], float(val["macro_f1"]))
            trial.report(best["f1"], step)
            if step < budget and trial.should_prune():  # at the budget's end, stopping saves nothing
                raise classify.StopTrial(step)

        t0 = time.time()
        try:
            results = classify.train_and_evaluate(trial_config(cfg, params), trial_dir, on_eval=on_eval)
        except classify.StopTrial as e:
            print(f"{tag} trial {trial.number} pruned at step {e.args[0]} (best val macro-F1 {best['f1']:.4f})",
                  flush=True)
            raise optuna.TrialPruned() from None
        except Exception as e:
            message = f"{type(e).__name__}: {e}"
            trial.set_user_attr("error", message[:2000])
            print(f"{tag} trial {trial.number} failed: {message[:500]}", flush=True)
            raise
        value = float(results["val"]["macro_f1"])
        trial.set_user_attr("seconds", time.time() - t0)
        trial.set_user_attr("best_step", results["best_step"])
        print(f"{tag} trial {trial.number} finished: val macro-F1 {value:.4f} at step {results['best_step']}",
              flush=True)
        return value

    return objective


def work(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path, worker_index: int = 0) -> None:
    """One worker: runs trials of the study until its trial budget is spent (several may run at once)."""
    workdir = pathlib.Path(workdir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # failures with their traceback, not every trial
    study = open_study(cfg, workdir)
    objective = _objective(cfg, workdir, f"[worker {worker_index}]")
    while _budget_left(study, int(_sweep(cfg).num_trials)):
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)


def _worker_process(cfg: ml_collections.ConfigDict, workdir: str, worker_index: int) -> None:
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    work(cfg, workdir, worker_index)


def _worker_main(parent_pid: int, target, *args) -> None:
    """Runs ``target`` in its own process group, which dies as a whole when the sweep's process does
    (a killed sweep leaves no worker training on, and its trials are retried when it is rerun)."""
    os.setpgrp()
    threading.Thread(target=_die_with_parent, args=(parent_pid,), daemon=True).start()
    target(*args)


def _die_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:  # an orphan is re-parented
        time.sleep(0.5)
    os.killpg(0, signal.SIGKILL)


def start_worker(ctx, target, args: tuple) -> multiprocessing.Process:
    """A worker process running ``target(*args)`` that ends with this process."""
    proc = ctx.Process(target=_worker_main, args=(os.getpid(), target, *args), daemon=False)
    proc.start()
    return proc


def _kill_workers(procs: dict[int, multiprocessing.Process]) -> None:
    for proc in procs.values():
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # not yet its own group, or already gone
            proc.kill()
        proc.join()


def _pid_alive(pid: int) -> bool:
    """Whether the process runs; a zombie (killed, its parent gone, not yet reaped by init) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: the state letter follows the command name in parentheses
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def fail_dead_trials(study: optuna.Study, pids: set[int] | None = None, retry: bool = True) -> int:
    """Marks this host's running trials whose process is gone (or is one of ``pids``) as failed.

    With ``retry`` each gets one retry that continues its checkpoints (a killed sweep resumes
    this way); without it (a worker that crashed mid-sweep) the failure stands.
    """
    host = socket.gethostname()
    count = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or pid is None:
            continue
        if (pids is not None and pid in pids) or (pids is None and not _pid_alive(pid)):
            reason = "its process died" if pids is None else "its worker process crashed"
            try:
                study._storage.set_trial_user_attr(t._trial_id, "error", reason)
                failed = study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another sweep process on this host failed (and retried) it first
            if failed:
                count += 1
                if retry:
                    _retry(study, study._storage.get_trial(t._trial_id))
    return count


def run_sweep(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path, workers: int = 1) -> dict:
    """Runs (or resumes) the sweep with ``workers`` processes on this host; writes and returns the summary."""
    workdir = pathlib.Path(workdir)
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    sweep = _sweep(cfg)
    check_space(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(cfg, workdir)
    recovered = fail_dead_trials(study)
    if recovered:
        print(f"[sweep] resuming: {recovered} interrupted trial(s) will continue from their checkpoints", flush=True)
    print(f"[sweep] {study.study_name}: {sweep.num_trials} trials of {cfg.peft.method} with {workers} worker(s), "
          f"ASHA rungs at steps {rungs(cfg)} of {trial_steps(cfg)}; storage "
          f"{storage_url(cfg, workdir)}", flush=True)
    ctx = multiprocessing.get_context("spawn")  # JAX is not fork-safe; each worker starts clean
    procs: dict[int, multiprocessing.Process] = {}
    t0 = time.time()
    try:
        _supervise(study, cfg, workdir, workers, ctx, procs)
    except BaseException:  # Ctrl-C or an error here: the workers end too
        _kill_workers(procs)
        raise
    summary = summarize(study, workdir, cfg)
    print(f"[sweep] done in {time.time() - t0:.0f} s: {summary['trials']}, {summary['steps_saved_by_pruning']} training steps "
          f"saved by pruning; best val macro-F1 "
          f"{summary['best_value']} with {summary['best_params']}", flush=True)
    return summary


def _supervise(study: optuna.Study, cfg: ml_collections.ConfigDict, workdir: pathlib.Path, workers: int, ctx,
               procs: dict[int, multiprocessing.Process]) -> None:
    """Keeps ``workers`` worker processes running until the trial budget is spent; replaces crashed ones."""
    sweep = _sweep(cfg)
    restarts = int(sweep.num_trials)  # a crashing trial costs one restart
    next_index = 0
    while True:
        for index, proc in list(procs.items()):
            if proc.exitcode is None:
                continue
            del procs[index]
            if proc.exitcode != 0:
                failed = fail_dead_trials(study, pids={proc.pid}, retry=False)
                print(f"[sweep] worker {index} exited with code {proc.exitcode}; {failed} trial(s) marked failed",
                      flush=True)
                restarts -= 1
        if len(procs) < workers and restarts >= 0 and _budget_left(study, int(sweep.num_trials)):
            procs[next_index] = start_worker(ctx, _worker_process, (cfg, str(workdir), next_index))
            next_index += 1
            continue
        if not procs:
            return
        time.sleep(1.0)


def summarize(study: optuna.Study, workdir: pathlib.Path, cfg: ml_collections.ConfigDict) -> dict:
    """Writes ``sweep_results.json`` and, when a trial finished, ``best_overrides.txt`` (an absl flagfile)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs["resume_of"] for t in trials if "resume_of" in t.user_attrs}
    counts = {name: sum(t.state == state and t.number not in retried for t in trials)
              for name, state in STATES.items()}
    counts["interrupted_and_retried"] = len(retried)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(done, key=lambda t: t.value) if done else None
    summary = {
        "study_name": study.study_name,
        "storage": storage_url(cfg, workdir),
        "method": cfg.peft.method,
        "objective": "best validation macro-F1 (maximize)",
        "best_value": best.value if best else None,
        "best_params": best.params if best else None,
        "best_trial": best.number if best else None,
        "best_workdir": best.user_attrs.get("workdir") if best else None,
        "trials": counts,
        # Training steps the pruned trials would have run to the budget's end but did not.
        "steps_saved_by_pruning": sum(trial_steps(cfg) - (t.last_step or 0) for t in trials
                                      if t.state == TrialState.PRUNED and t.number not in retried),
        "all_trials": [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                        "last_step": t.last_step, "error": t.user_attrs.get("error")} for t in trials],
    }
    (workdir / "sweep_results.json").write_text(json.dumps(summary, indent=2))
    if best:
        fixed = {k: v for k, v in space_lib.space_for(_sweep(cfg), cfg.peft.method).items()
                 if not isinstance(v, space_lib.Dist)}
        lines = [space_lib.format_flag(k, v) for k, v in {**fixed, **best.params}.items()]
        (workdir / "best_overrides.txt").write_text("\n".join(lines) + "\n")
    return summary
