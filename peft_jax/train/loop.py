"""Training and evaluation of one experiment: the loop behind ``launch/train.py``.

Writes into the workdir: ``config.json``, ``checkpoints/{latest,best}`` (orbax; a rerun
of the same command continues from ``latest``), ``tb/`` (TensorBoard), ``adapter/`` and
``results.json`` (the contract of DESIGN.md).
"""
from __future__ import annotations

import json
import math
import pathlib
import signal
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from flax import nnx

from peft_jax import data as data_lib
from peft_jax import sharding as shd
from peft_jax.adapters import param_report
from peft_jax.adapters.io import save_adapter
from peft_jax.train import builder, metrics as metrics_lib, optim, step as step_lib

# Fields that may change between a run and its continuation without making it another experiment.
RESUMABLE_CHANGES = ("train.num_steps", "train.progress", "train.log_every", "train.checkpoint_every",
                     "train.eval_every", "dataset.num_workers", "dataset.download", "dataset.data_dir",
                     "dataset.manual_dir", "mesh.data", "mesh.fsdp")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_workdir(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Refuses a workdir that holds another experiment's checkpoints."""
    path = workdir / "config.json"
    current = json.loads(cfg.to_json())
    if path.is_file():
        previous = _flatten(json.loads(path.read_text()))
        now = _flatten(current)
        differ = sorted(k for k in set(previous) | set(now)
                        if previous.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
        if differ and (workdir / "checkpoints").exists():
            raise ValueError(
                f"workdir {workdir} holds checkpoints of a different experiment (differs in: "
                + ", ".join(f"{k}: {previous.get(k)!r} there vs {now.get(k)!r} now" for k in differ[:6])
                + "). Use a new --workdir, or delete that one to start over.")


def record_config(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(json.loads(cfg.to_json()), indent=2, sort_keys=True))


def _model_size(cfg: ml_collections.ConfigDict) -> int:
    return int(cfg.model.image_size)


def _put_batch(batch: dict, sharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items() if k in ("image", "label")}


def _local_rows(x: np.ndarray) -> np.ndarray:
    """This process's contiguous share of a global batch that every process holds."""
    n = jax.process_count()
    per = x.shape[0] // n
    return x[jax.process_index() * per:(jax.process_index() + 1) * per]


class Preempted(Exception):
    """SIGTERM arrived; the latest state was saved."""


def catch_sigterm() -> tuple[dict, Callable[[], None]]:
    """(stop, restore): ``stop["signal"]`` is set when SIGTERM arrives (handled in the main thread
    only), so a loop can save at the end of its current step and raise ``Preempted``;
    ``restore()`` puts the previous handler back."""
    stop = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        return stop, lambda: None
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    return stop, lambda: signal.signal(signal.SIGTERM, previous)


class StopTrial(Exception):
    """Raised by an ``on_eval`` hook (e.g. a pruned hyper-parameter trial) to end the run after a saved evaluation."""


def checkpoint_manager(directory: pathlib.Path) -> ocp.CheckpointManager:
    """An orbax manager keeping one checkpoint (also used by launch/train_t2i.py).

    Saves go to a temporary folder renamed into place, so a kill mid-save leaves the previous
    checkpoint intact; leftovers of such a save are removed at the next start.
    """
    opts = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, create=True,
                                        cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory.absolute(), options=opts)


class Checkpoints:
    """Two orbax managers: the latest state (for resuming) and the best by validation macro-F1."""

    def __init__(self, workdir: pathlib.Path):
        self.latest = checkpoint_manager(workdir / "checkpoints" / "latest")
        self.best = checkpoint_manager(workdir / "checkpoints" / "best")

    @staticmethod
    def save(manager: ocp.CheckpointManager, step: int, state: dict, meta: dict) -> None:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                     force=True)
        manager.wait_until_finished()

    @staticmethod
    def restore(manager: ocp.CheckpointManager, target: dict) -> tuple[dict, dict]:
        step = manager.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                           meta=ocp.args.JsonRestore()))
        return out.state, out.meta


def evaluate(steps: step_lib.Steps, state: dict, split: data_lib.Split, cfg: ml_collections.ConfigDict,
             num_devices: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Metrics of one split, and its per-image labels and logits (the test's are kept for paired statistics)."""
    bs = int(math.ceil(cfg.train.eval_batch_size / num_devices) * num_devices)
    logits, labels = [], []
    for batch in data_lib.eval_batches(split, batch_size=bs, image_size=_model_size(cfg)):
        images = jax.make_array_from_process_local_data(steps.batch_sharding, _local_rows(batch["image"]))
        out = np.asarray(steps.eval(state["trainable"], state["frozen"], state["rest"], images))
        logits.append(out[batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
    logits_np, labels_np = np.concatenate(logits), np.concatenate(labels)
    result = metrics_lib.classification_metrics(labels_np, logits_np)
    if split.subgroups:
        result["subgroups"] = metrics_lib.subgroup_metrics(labels_np, logits_np, split.subgroups)
    return result, {"labels": labels_np, "logits": logits_np}


def _check_config(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
    if cfg.train.batch_size % num_devices:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {num_devices} devices "
                         f"of the mesh (mesh.data x mesh.fsdp); use a multiple of {num_devices}")
    if cfg.train.num_steps < 1:
        raise ValueError(f"train.num_steps must be at least 1, got {cfg.train.num_steps}")
    if cfg.train.bn_stats not in ("update", "frozen"):
        raise ValueError(f"train.bn_stats must be 'update' or 'frozen', got {cfg.train.bn_stats!r}")


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       on_eval: Callable[[int, dict], None] | None = None) -> dict:
    """Trains, early-stops on validation macro-F1, tests the best checkpoint; returns results.json's dict.

    ``on_eval(step, val_metrics)`` runs after each validation (and its checkpoint save); it may raise
    ``StopTrial`` to end the run there without testing (hyper-parameter search prunes trials this way).
    """
    workdir = pathlib.Path(workdir)
    mesh = shd.make_mesh(cfg.mesh)
    num_devices = mesh.size
    _check_config(cfg, num_devices)
    check_workdir(cfg, workdir)

    data = data_lib.load_dataset(cfg.dataset, seed=cfg.seed)
    built = builder.build(cfg, data.num_classes)
    report = param_report(built.model, built.trainable)
    if jax.process_index() == 0:
        record_config(cfg, workdir)  # only now: a run that could not start leaves nothing behind
    split = step_lib.split_model(built.model, built.trainable, freeze_bn_stats=cfg.train.bn_stats == "frozen")
    tx = optim.make_optimizer(cfg.train)
    opt_shape = jax.eval_shape(tx.init, split.trainable)
    steps = step_lib.compile_steps(split, tx, opt_shape, mesh, min_shard_size=cfg.mesh.min_shard_size,
                                   label_smoothing=cfg.train.label_smoothing, skip_nonfinite=cfg.train.skip_nonfinite)
    state = {
        "trainable": jax.device_put(split.trainable, steps.shardings["trainable"]),
        "frozen": jax.device_put(split.frozen, steps.shardings["frozen"]),
        "rest": jax.device_put(split.rest, steps.shardings["rest"]),
    }
    state["opt_state"] = jax.jit(tx.init, out_shardings=steps.shardings["opt_state"])(state["trainable"])

    ckpts = Checkpoints(workdir)
    meta = {"step": 0, "best_f1": -1.0, "best_step": -1, "bad_evals": 0, "stopped_early": False, "history": [],
            "skipped_nonfinite": 0}
    saved = ("trainable", "rest", "opt_state")
    if ckpts.latest.latest_step() is not None:
        restored, meta = Checkpoints.restore(ckpts.latest, {k: state[k] for k in saved})
        state.update({k: jax.device_put(restored[k], steps.shardings[k]) for k in saved})
        print(f"[resume] {workdir}: continuing from step {meta['step']} (best val macro-F1 {meta['best_f1']:.4f} "
              f"at step {meta['best_step']})")

    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(workdir / "tb")) if jax.process_index() == 0 else None
    start = int(meta["step"])
    num_steps = int(cfg.train.num_steps)
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    batches = data_lib.train_batches(
        data.train, batch_size=cfg.train.batch_size, image_size=_model_size(cfg), seed=cfg.seed,
        start_step=start, augment=cfg.dataset.augment, num_workers=cfg.dataset.num_workers, **shard)

    def save_latest(step: int) -> None:
        meta["step"] = step
        Checkpoints.save(ckpts.latest, step, {k: state[k] for k in saved}, meta)

    t0 = time.time()
    bar = tqdm.tqdm(total=num_steps, initial=start, desc=f"{cfg.peft.method} on {cfg.dataset.name}",
                    disable=not cfg.train.progress or jax.process_index() != 0, dynamic_ncols=True)
    log = (workdir / "metrics.jsonl").open("a") if jax.process_index() == 0 else None

    def check(step_metrics, at_step: int) -> dict:
        """Host copy of one step's metrics; stops the run on a NaN/Inf unless it was skipped."""
        m = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        if m["nonfinite"]:
            if not cfg.train.skip_nonfinite:
                raise FloatingPointError(
                    f"non-finite loss or gradient (loss {m['loss']}, gradient norm {m['grad_norm']}) at step "
                    f"{at_step}; nothing was saved after it. The last good checkpoint is step "
                    f"{ckpts.latest.latest_step()} in {workdir / 'checkpoints' / 'latest'} (best: step "
                    f"{ckpts.best.latest_step()}). Lower train.lr, check the data, or set "
                    "train.skip_nonfinite=True to skip such updates.")
            meta["skipped_nonfinite"] += 1
        return m

    stop, restore_sigterm = catch_sigterm()
    step = start
    pending = None  # the previous step's metrics, checked one step late so the host never stalls the device
    try:
        while step < num_steps and not meta["stopped_early"]:
            batch = _put_batch(next(batches), steps.batch_sharding)
            state["trainable"], state["rest"], state["opt_state"], m = steps.train(
                state["trainable"], state["frozen"], state["rest"], state["opt_state"], batch)
            step += 1
            bar.update(1)
            if pending is not None:
                check(*pending)
            pending = (m, step)
            evaluate_now = step % cfg.train.eval_every == 0 or step == num_steps
            save_now = evaluate_now or step % cfg.train.checkpoint_every == 0 or stop["signal"]
            if step % cfg.train.log_every == 0 or save_now:
                host = check(*pending)
                pending = None
                bar.set_postfix(loss=f"{host['loss']:.4f}", best_f1=f"{meta['best_f1']:.3f}")
                if log:
                    log.write(json.dumps({"step": step, **host}) + "\n")
                    log.flush()
                if writer:
                    for k, v in host.items():
                        writer.add_scalar(f"train/{k}", v, step)
            if evaluate_now:
                val, _ = evaluate(steps, state, data.validation, cfg, num_devices)
                meta["history"].append({"step": step, "val_macro_f1": val["macro_f1"], "val_loss": val["loss"]})
                if writer:
                    for k in ("macro_f1", "accuracy", "balanced_accuracy", "auroc", "ece", "loss"):
                        writer.add_scalar(f"val/{k}", val[k], step)
                if val["macro_f1"] > meta["best_f1"]:
                    meta.update(best_f1=val["macro_f1"], best_step=step, bad_evals=0, best_val=val)
                    Checkpoints.save(ckpts.best, step, {k: state[k] for k in saved}, meta)
                else:
                    meta["bad_evals"] += 1
                    if cfg.train.patience and meta["bad_evals"] >= cfg.train.patience:
                        meta["stopped_early"] = True
                        print(f"[early stop] no better validation macro-F1 for {meta['bad_evals']} evaluations; "
                              f"best {meta['best_f1']:.4f} at step {meta['best_step']}")
            if save_now:
                save_latest(step)
            if evaluate_now and on_eval is not None:
                on_eval(step, val)
            if stop["signal"]:
                raise Preempted(f"[preempted] SIGTERM at step {step}: saved {workdir / 'checkpoints' / 'latest'}; "
                                "rerun the same command to continue")
        if pending is not None:
            check(*pending)
    except StopTrial:
        bar.close()
        if writer:
            writer.close()
        raise
    finally:
        restore_sigterm()
        if log:
            log.close()
    bar.close()
    train_seconds = time.time() - t0

    # Test the best checkpoint.
    best, best_meta = Checkpoints.restore(ckpts.best, {k: state[k] for k in saved})
    state.update({k: jax.device_put(best[k], steps.shardings[k]) for k in ("trainable", "rest")})
    test, test_outputs = evaluate(steps, state, data.test, cfg, num_devices)
    if writer:
        for k in ("macro_f1", "accuracy", "balanced_accuracy", "auroc", "ece"):
            writer.add_scalar(f"test/{k}", test[k], best_meta["best_step"])
        writer.close()

    results = {
        "method": cfg.peft.method,
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "data_fraction": float(cfg.dataset.fraction),
        "seed": int(cfg.seed),
        "trainable_params": report["trainable_params"],
        "total_params": report["total_params"],
        "trainable_percent": report["trainable_percent"],
        "param_groups": report["groups"],
        "best_step": int(best_meta["best_step"]),
        "steps_run": int(step),
        "stopped_early": bool(meta["stopped_early"]),
        "skipped_nonfinite_steps": int(meta["skipped_nonfinite"]),
        "train_examples": int(len(data.train.labels)),
        "class_names": list(data.class_names),
        "val": best_meta.get("best_val", {}),
        "test": test,
        "train_seconds_this_run": train_seconds,
    }
    if jax.process_index() == 0:
        nnx.update(built.model, state["trainable"], state["rest"])
        save_adapter(workdir / "adapter", built.model, built.trainable, config=cfg, base_hash=built.base_hash,
                     extra={"class_names": list(data.class_names), "dataset": cfg.dataset.name})
        with (workdir / "test_predictions.tmp.npz").open("wb") as f:  # before results.json: a finished run has both
            np.savez(f, **test_outputs)
        (workdir / "test_predictions.tmp.npz").rename(workdir / "test_predictions.npz")
        tmp = workdir / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2))
        tmp.rename(workdir / "results.json")
    return results


def dry_run(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path, num_classes: int = 2) -> dict:
    """Builds the model abstractly, shards it, lowers and compiles one train step without running it."""
    workdir = pathlib.Path(workdir)
    mesh = shd.make_mesh(cfg.mesh)
    _check_config(cfg, mesh.size)
    built = builder.build_abstract(cfg, num_classes)
    report = param_report(built.model, built.trainable)
    split = step_lib.split_model(built.model, built.trainable, freeze_bn_stats=cfg.train.bn_stats == "frozen")
    tx = optim.make_optimizer(cfg.train)
    opt_shape = jax.eval_shape(tx.init, split.trainable)
    steps = step_lib.compile_steps(split, tx, opt_shape, mesh, min_shard_size=cfg.mesh.min_shard_size,
                                   label_smoothing=cfg.train.label_smoothing)

    def abstract(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    size = _model_size(cfg)
    batch = {
        "image": jax.ShapeDtypeStruct((cfg.train.batch_size, size, size, 3), jnp.float32, sharding=steps.batch_sharding),
        "label": jax.ShapeDtypeStruct((cfg.train.batch_size,), jnp.int32, sharding=steps.batch_sharding),
    }
    compiled = steps.train.lower(
        abstract(split.trainable, steps.shardings["trainable"]), abstract(split.frozen, steps.shardings["frozen"]),
        abstract(split.rest, steps.shardings["rest"]), abstract(opt_shape, steps.shardings["opt_state"]), batch,
    ).compile()
    mem = compiled.memory_analysis()
    memory = {k: int(getattr(mem, k)) for k in dir(mem) if k.endswith("_in_bytes")} if mem is not None else {}
    result = {
        "trainable_params": report["trainable_params"],
        "total_params": report["total_params"],
        "trainable_percent": report["trainable_percent"],
        "frozen_bytes_total": builder.parameter_bytes(split.frozen),
        "frozen_bytes_per_device": shd.bytes_per_device(split.frozen, steps.shardings["frozen"]),
        "trainable_bytes_per_device": shd.bytes_per_device(split.trainable, steps.shardings["trainable"]),
        "optimizer_bytes_per_device": shd.bytes_per_device(opt_shape, steps.shardings["opt_state"]),
        "num_devices": mesh.size,
        "memory_analysis": memory,
        "model": cfg.model.name,
        "method": cfg.peft.method,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "dry_run.json").write_text(json.dumps(result, indent=2))
    return result
