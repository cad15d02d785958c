"""One classification experiment, the run behind ``launch/train.py``: train, early-stop, test the best.

Writes into the workdir (peft_jax/train/workdir.py): ``run.lock`` while it runs, ``config.json``,
``checkpoints/{latest,best}`` (a rerun of the same command continues from the newer of the two),
``metrics.jsonl`` and ``tb/`` (the logged training metrics), ``adapter/`` and ``results.json`` (the contract
of DESIGN.md). ``dry_run`` builds the same run abstractly and compiles one step (``dry_run.json``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from flax import nnx

from peft_jax import data as data_lib
from peft_jax import sharding as shd
from peft_jax.adapters import param_report
from peft_jax.adapters.io import save_adapter
from peft_jax.errors import UserError
from peft_jax.metrics import classification as metrics_lib
from peft_jax.train import builder, step as step_lib
from peft_jax.train.startup import StartupClock
from peft_jax.train.state import TrainState, setup
from peft_jax.train.workdir import NONFINITE_MARK, Workdir, sigterm_flag, writing

EVAL_METRICS = ("macro_f1", "accuracy", "balanced_accuracy", "auroc", "ece", "loss")


class StopTrial(Exception):
    """Raised by an ``on_eval`` hook (e.g. a pruned hyper-parameter trial) to end the run after a saved evaluation."""


POSITIVE = ("batch_size", "eval_batch_size", "num_steps", "eval_every", "checkpoint_every", "log_every")


def check_config(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
    """Refuses a config that cannot run, before anything is written (so nothing blocks the corrected rerun)."""
    for key in POSITIVE:
        value = cfg.train[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"train.{key} must be a positive integer, got {value!r}")
    if cfg.train.batch_size % num_devices:
        raise UserError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {num_devices} devices "
                         f"of the mesh (mesh.data x mesh.fsdp); use a multiple of {num_devices}")
    if cfg.train.bn_stats not in ("update", "frozen"):
        raise UserError(f"train.bn_stats must be 'update' or 'frozen', got {cfg.train.bn_stats!r}")


def _local_rows(x: np.ndarray) -> np.ndarray:
    """This process's contiguous share of a global batch that every process holds."""
    n = jax.process_count()
    per = x.shape[0] // n
    return x[jax.process_index() * per:(jax.process_index() + 1) * per]


def evaluate(steps: step_lib.Steps, state: TrainState, split: data_lib.Split,
             cfg: ml_collections.ConfigDict) -> tuple[dict, dict[str, np.ndarray]]:
    """Metrics of one split (with subgroups where it has them), and its per-image labels and logits (the
    test's are kept for paired statistics)."""
    n = state.mesh.size
    bs = int(math.ceil(cfg.train.eval_batch_size / n) * n)
    logits, labels = [], []
    for batch in data_lib.eval_batches(split, batch_size=bs, image_size=int(cfg.model.image_size)):
        images = jax.make_array_from_process_local_data(state.batch_sharding, _local_rows(batch["image"]))
        out = np.asarray(steps.eval(state.trainable, state.frozen, state.rest, images))
        logits.append(out[batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
    logits_np, labels_np = np.concatenate(logits), np.concatenate(labels)
    result = metrics_lib.classification_metrics(labels_np, logits_np)
    if split.subgroups:
        result["subgroups"] = metrics_lib.subgroup_metrics(labels_np, logits_np, split.subgroups)
    return result, {"labels": labels_np, "logits": logits_np}


@dataclasses.dataclass
class Progress:
    """What a checkpoint's ``meta`` holds besides the state: the step, early stopping and the history."""

    step: int = 0
    best_f1: float = -1.0
    best_step: int = -1
    bad_evals: int = 0
    stopped_early: bool = False
    history: list = dataclasses.field(default_factory=list)
    skipped_nonfinite: int = 0
    best_val: dict = dataclasses.field(default_factory=dict)

    def meta(self) -> dict:
        return dataclasses.asdict(self)


def _abandon(writer) -> None:
    """Stops a tensorboardX writer whose close failed (a full disk): it would retry at exit and print a
    traceback there, after the run's own error line."""
    for w in (writer.all_writers or {}).values():
        with contextlib.suppress(Exception):
            w.event_writer._worker.stop()
        w.event_writer._closed = True


class Log:
    """The progress bar, ``metrics.jsonl`` and TensorBoard, written by process 0 only.

    On a terminal the bar redraws in place; in a log file (no TTY) it would write a carriage-return
    line per update, so there a plain line is printed per logged step instead.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: Workdir, start: int, best_f1: float):
        main = jax.process_index() == 0
        from tensorboardX import SummaryWriter

        self.folder = workdir.path
        with writing(self.folder):
            self.writer = SummaryWriter(str(workdir.path / "tb")) if main else None
            self.jsonl = (workdir.path / "metrics.jsonl").open("a") if main else None
        show = bool(cfg.train.progress) and main
        self.lines = show and not sys.stderr.isatty()
        self.total, self.desc = int(cfg.train.num_steps), f"{cfg.peft.method} on {cfg.dataset.name}"
        self.bar = tqdm.tqdm(total=self.total, initial=start, desc=self.desc, disable=not show or self.lines,
                             dynamic_ncols=True)
        self.shown = {"loss": float("nan"), "best_f1": best_f1}

    def show(self, step: int, **values: float) -> None:
        """The latest loss and best validation macro-F1, on the bar or as one line."""
        self.shown.update(values)
        best = self.shown["best_f1"]
        text = {"loss": f"{self.shown['loss']:.4f}", "best_f1": f"{best:.3f}" if best >= 0 else "-"}
        self.bar.set_postfix(text)
        if self.lines:
            print(f"{self.desc}: step {step}/{self.total} loss {text['loss']} best_f1 {text['best_f1']}",
                  file=sys.stderr, flush=True)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def train_step(self, step: int, metrics: dict, best_f1: float) -> None:
        self.show(step, loss=metrics["loss"], best_f1=best_f1)
        if self.jsonl:
            with writing(self.folder):
                self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
                self.jsonl.flush()
        self.scalars("train", metrics, step)

    def close(self, failing: bool = False) -> None:
        """Closes the files; with ``failing`` (the run is already ending on an error) a write error here is
        dropped, so the first error is the one reported."""
        self.bar.close()
        try:
            with writing(self.folder):
                for f in (self.jsonl, self.writer):
                    if f:
                        f.close()
        except Exception:
            if self.writer:
                _abandon(self.writer)
            if not failing:
                raise


def choose_checkpoint(workdir: Workdir) -> str | None:
    """The checkpoint a rerun continues from (None: from step 0), consistent whatever was killed or deleted.

    At an evaluation step ``best`` is saved before ``latest``, with the same state and meta, so a ``best``
    ahead of ``latest`` (a kill or a full disk between the two saves, or ``latest`` deleted) is the newer
    state. A ``latest`` whose best evaluation is gone from ``best`` (deleted) can reach the uninterrupted
    run's result only by training again: the run starts over, and says so.
    """
    latest, best = workdir.latest_step("latest"), workdir.latest_step("best")
    if best is not None and (latest is None or best > latest):
        return "best"
    if latest is None:
        return None
    best_step = workdir.meta("latest")["best_step"]
    if best_step in (-1, best, latest):  # no evaluation yet, consistent, or latest holds the best state itself
        return "latest"
    print(f"[resume] {workdir.path}: checkpoints/best (step {best_step}) is missing and checkpoints/latest is at "
          f"step {latest}; the best state can only be rebuilt by training again: starting over from step 0")
    if jax.process_index() == 0:
        workdir.delete("latest")
        workdir.delete("best")
    return None


def resume(workdir: Workdir, state: TrainState, source: str | None) -> Progress:
    """The progress saved in checkpoint ``source`` (its state loaded into ``state``), or a fresh start.

    The other checkpoint is brought level where it lags (a copy of the same state), so the next saves of
    both continue from one step.
    """
    if source is None:
        return Progress()
    restored, meta = workdir.restore(source, state.saved())
    state.load(restored)
    progress = Progress(**meta)
    print(f"[resume] {workdir.path}: continuing from step {progress.step} of checkpoints/{source} (best val "
          f"macro-F1 {progress.best_f1:.4f} at step {progress.best_step})")
    if source == "best" and workdir.latest_step("latest") != progress.step:
        workdir.save("latest", progress.step, state.saved(), progress.meta())
    if source == "latest" and progress.best_step == progress.step and workdir.latest_step("best") != progress.step:
        workdir.save("best", progress.step, state.saved(), progress.meta())
    return progress


def host_metrics(step_metrics, at_step: int, cfg: ml_collections.ConfigDict, workdir: Workdir,
                 progress: Progress) -> dict:
    """Host copy of one step's metrics; stops the run on a NaN/Inf unless such updates are skipped."""
    m = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    if m["nonfinite"]:
        if not cfg.train.skip_nonfinite:
            if jax.process_index() == 0:  # lets the advised fixes change on this workdir (workdir.NONFINITE_FIXES)
                workdir.write_json(NONFINITE_MARK, {"step": at_step, "loss": m["loss"], "grad_norm": m["grad_norm"]})
            raise FloatingPointError(
                f"non-finite loss or gradient (loss {m['loss']}, gradient norm {m['grad_norm']}) at step "
                f"{at_step}; nothing was saved after it. The last checkpoint is step "
                f"{workdir.latest_step('latest')} in {workdir.path / 'checkpoints' / 'latest'} (best: step "
                f"{workdir.latest_step('best')}). Lower train.lr, or set train.skip_nonfinite=True to skip such "
                "updates, and rerun on this workdir (it starts over from step 0); or check the data.")
        progress.skipped_nonfinite += 1
    return m


def validate(steps, state: TrainState, split: data_lib.Split, cfg: ml_collections.ConfigDict, workdir: Workdir,
             progress: Progress, log: Log) -> dict:
    """Scores the validation split at ``progress.step``: a better macro-F1 is saved as ``best``, otherwise
    it counts towards early stopping."""
    val, _ = evaluate(steps, state, split, cfg)
    step = progress.step
    progress.history.append({"step": step, "val_macro_f1": val["macro_f1"], "val_loss": val["loss"]})
    log.scalars("val", {k: val[k] for k in EVAL_METRICS}, step)
    if val["macro_f1"] > progress.best_f1:
        progress.best_f1, progress.best_step, progress.bad_evals, progress.best_val = val["macro_f1"], step, 0, val
        workdir.save("best", step, state.saved(), progress.meta())
        log.show(step, best_f1=progress.best_f1)
        return val
    progress.bad_evals += 1
    if cfg.train.patience and progress.bad_evals >= cfg.train.patience:
        progress.stopped_early = True
        print(f"[early stop] no better validation macro-F1 for {progress.bad_evals} evaluations; "
              f"best {progress.best_f1:.4f} at step {progress.best_step}")
    return val


def train(cfg: ml_collections.ConfigDict, workdir: Workdir, state: TrainState, steps: step_lib.Steps,
          data: data_lib.DatasetSplits, progress: Progress, on_eval: Callable[[int, dict], None] | None,
          clock: StartupClock | None = None) -> None:
    """Steps until ``train.num_steps`` or early stopping: logs, validates, checkpoints and honours SIGTERM.

    A step's metrics are read one step late, so the host never stalls an accelerator (CPU steps run
    inline: peft_jax/xla_cpu.py). ``clock``: the
    start-up line is printed once the first step (and with it the compilation) is dispatched.
    """
    num_steps, t = int(cfg.train.num_steps), cfg.train
    batches = data_lib.train_batches(
        data.train, batch_size=t.batch_size, image_size=int(cfg.model.image_size), seed=cfg.seed,
        start_step=progress.step, augment=cfg.dataset.augment, num_workers=cfg.dataset.num_workers,
        shard_index=jax.process_index(), shard_count=jax.process_count())
    log, pending = Log(cfg, workdir, progress.step, progress.best_f1), None
    try:
        with sigterm_flag() as stop:
            while progress.step < num_steps and not progress.stopped_early:
                batch = {k: jax.make_array_from_process_local_data(state.batch_sharding, v)
                         for k, v in next(batches).items() if k in ("image", "label")}
                m = state.advance(steps.train, batch)
                if clock is not None and jax.process_index() == 0:
                    clock.mark("first batch and compilation")
                    tqdm.tqdm.write(clock.line(), file=sys.stdout)
                clock = None
                progress.step += 1
                log.bar.update(1)
                if pending is not None:
                    host_metrics(*pending, cfg, workdir, progress)
                step, pending = progress.step, (m, progress.step)
                evaluate_now = step % t.eval_every == 0 or step == num_steps
                save_now = evaluate_now or step % t.checkpoint_every == 0 or stop["signal"]
                if step % t.log_every == 0 or save_now:
                    log.train_step(step, host_metrics(*pending, cfg, workdir, progress), progress.best_f1)
                    pending = None
                val = validate(steps, state, data.validation, cfg, workdir, progress, log) if evaluate_now else None
                if save_now:
                    workdir.save("latest", step, state.saved(), progress.meta())
                if val is not None and on_eval is not None:
                    on_eval(step, val)
                if stop["signal"]:
                    raise workdir.preempted(step)
            if pending is not None:
                host_metrics(*pending, cfg, workdir, progress)
    except BaseException:
        log.close(failing=True)
        raise
    log.close()


def test_best(cfg: ml_collections.ConfigDict, workdir: Workdir, state: TrainState, steps: step_lib.Steps,
              split: data_lib.Split) -> tuple[dict, dict, dict]:
    """(test metrics, per-image labels and logits, best checkpoint's meta): the best checkpoint's state,
    scored once on the test split."""
    best, best_meta = workdir.restore("best", state.saved())
    state.load({k: best[k] for k in ("trainable", "rest")})
    test, outputs = evaluate(steps, state, split, cfg)
    if jax.process_index() == 0:
        from tensorboardX import SummaryWriter

        with writing(workdir.path / "tb"), SummaryWriter(str(workdir.path / "tb")) as writer:
            for k in EVAL_METRICS[:-1]:
                writer.add_scalar(f"test/{k}", test[k], best_meta["best_step"])
    return test, outputs, best_meta


def results_record(cfg: ml_collections.ConfigDict, report: dict, data: data_lib.DatasetSplits, progress: Progress,
                   best_meta: dict, test: dict, train_seconds: float) -> dict:
    """results.json: the contract of DESIGN.md."""
    return {
        "method": cfg.peft.method, "model": cfg.model.name, "dataset": cfg.dataset.name,
        "data_fraction": float(cfg.dataset.fraction), "seed": int(cfg.seed),
        "trainable_params": report["trainable_params"], "total_params": report["total_params"],
        "trainable_percent": report["trainable_percent"], "param_groups": report["groups"],
        "best_step": int(best_meta["best_step"]), "steps_run": int(progress.step),
        "stopped_early": bool(progress.stopped_early), "skipped_nonfinite_steps": int(progress.skipped_nonfinite),
        "train_examples": int(len(data.train.labels)), "class_names": list(data.class_names),
        "val": best_meta.get("best_val", {}), "test": test, "train_seconds_this_run": train_seconds,
    }


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       on_eval: Callable[[int, dict], None] | None = None) -> dict:
    """Trains, early-stops on validation macro-F1, tests the best checkpoint; returns results.json's dict.

    ``on_eval(step, val_metrics)`` runs after each validation (and its checkpoint save); it may raise
    ``StopTrial`` to end the run there without testing (hyper-parameter search prunes trials this way).
    """
    workdir = Workdir(workdir)
    mesh = shd.make_mesh(cfg.mesh)
    check_config(cfg, mesh.size)
    with workdir.locked() if jax.process_index() == 0 else contextlib.nullcontext():
        return _run(cfg, workdir, mesh, on_eval)


def _run(cfg: ml_collections.ConfigDict, workdir: Workdir, mesh, on_eval: Callable[[int, dict], None] | None) -> dict:
    """``train_and_evaluate`` inside the workdir's lock: every check before the first write."""
    clock = StartupClock()
    start_over = workdir.refuse_other_experiment(cfg)
    data = data_lib.load_dataset(cfg.dataset, seed=cfg.seed)
    clock.mark("data")
    built = builder.build(cfg, data.num_classes)
    clock.mark("model")
    report = param_report(built.model, built.trainable)
    workdir.bind(cfg, built.base_hash)
    source = None if start_over else choose_checkpoint(workdir)
    if source is not None:
        workdir.meta(source)  # refuses another experiment's checkpoint, or other base weights, before any write
    if jax.process_index() == 0:
        workdir.record_config(cfg, start_over)  # only now: a run that could not start leaves nothing behind
    state = setup(cfg, built.model, built.trainable, mesh)
    steps = step_lib.compile_steps(state, cfg.train)
    clock.mark("sharding")
    progress = resume(workdir, state, source)
    t0 = time.time()
    train(cfg, workdir, state, steps, data, progress, on_eval, clock)
    train_seconds = time.time() - t0
    test, test_outputs, best_meta = test_best(cfg, workdir, state, steps, data.test)
    results = results_record(cfg, report, data, progress, best_meta, test, train_seconds)
    if jax.process_index() == 0:
        nnx.update(built.model, state.trainable, state.rest)
        with writing(workdir.path / "adapter"):
            save_adapter(workdir.path / "adapter", built.model, built.trainable, config=cfg,
                         base_hash=built.base_hash, extra={"class_names": list(data.class_names),
                                                           "dataset": cfg.dataset.name})
        workdir.write_npz("test_predictions.npz", test_outputs)  # before results.json: a finished run has both
        workdir.write_json("results.json", results)
    return results


def lower_train_step(cfg: ml_collections.ConfigDict, num_classes: int = 2):
    """Builds the model abstractly, shards it and lowers one train step (traced, shapes checked, nothing
    allocated): ``(lowered, state, param_report)``. ``dry_run`` compiles it; lowering alone is the cheap
    check that a method's step is well-formed on a large model."""
    mesh = shd.make_mesh(cfg.mesh)
    check_config(cfg, mesh.size)
    built = builder.build_abstract(cfg, num_classes)
    report = param_report(built.model, built.trainable)
    state = setup(cfg, built.model, built.trainable, mesh)
    steps = step_lib.compile_steps(state, cfg.train)
    size, bs = int(cfg.model.image_size), cfg.train.batch_size
    batch = {"image": jax.ShapeDtypeStruct((bs, size, size, 3), jnp.float32, sharding=state.batch_sharding),
             "label": jax.ShapeDtypeStruct((bs,), jnp.int32, sharding=state.batch_sharding)}
    lowered = steps.train.lower(*(state.abstract(k) for k in ("trainable", "frozen", "rest", "opt_state")), batch)
    return lowered, state, report


def dry_run(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path, num_classes: int = 2) -> dict:
    """Builds the model abstractly, shards it, lowers and compiles one train step without running it."""
    workdir = pathlib.Path(workdir)
    lowered, state, report = lower_train_step(cfg, num_classes)
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    result = {
        "trainable_params": report["trainable_params"], "total_params": report["total_params"],
        "trainable_percent": report["trainable_percent"],
        "frozen_bytes_total": builder.parameter_bytes(state.frozen),
        "frozen_bytes_per_device": shd.bytes_per_device(state.frozen, state.shardings["frozen"]),
        "trainable_bytes_per_device": shd.bytes_per_device(state.trainable, state.shardings["trainable"]),
        "optimizer_bytes_per_device": shd.bytes_per_device(state.opt_state, state.shardings["opt_state"]),
        "num_devices": state.mesh.size,
        "memory_analysis": {k: int(getattr(mem, k)) for k in dir(mem) if k.endswith("_in_bytes")} if mem else {},
        "model": cfg.model.name, "method": cfg.peft.method,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    Workdir(workdir).write_json("dry_run.json", result)
    return result
