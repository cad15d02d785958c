"""A run's home on disk: the experiment record, checkpoints, preemption and atomic outputs.

Every kind of run (classification, text-to-image, a sweep trial, a grid cell) keeps its state in one
``Workdir``:

    config.json               the full config; a rerun of another experiment is refused
    checkpoints/<name>/<step> orbax, one per name (``latest`` to resume, ``best`` by validation)
    *.json, *.npz             results written atomically (temporary file, then rename)

A checkpoint is a state pytree plus a JSON ``meta`` dict (step, early-stopping state, losses); what a
run needs to know about its checkpoint (a base-weights hash, say) belongs in ``meta``.
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import signal
import threading
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

# Fields that may change between a run and its continuation without making it another experiment.
RESUMABLE_CHANGES = ("train.num_steps", "train.progress", "train.log_every", "train.checkpoint_every",
                     "train.eval_every", "dataset.num_workers", "dataset.download", "dataset.data_dir",
                     "dataset.manual_dir", "mesh.data", "mesh.fsdp")


class Preempted(Exception):
    """SIGTERM arrived; the latest state was saved (launch scripts exit with 143)."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_json(path: pathlib.Path, obj, indent: int = 2, sort_keys: bool = False) -> None:
    """Writes ``path`` whole or not at all: a temporary file renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str))
    tmp.rename(path)


def checkpoint_manager(directory: pathlib.Path) -> ocp.CheckpointManager:
    """An orbax manager keeping one checkpoint.

    Saves go to a temporary folder renamed into place, so a kill mid-save leaves the previous
    checkpoint intact; leftovers of such a save are removed at the next start.
    """
    opts = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, create=True,
                                        cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory.absolute(), options=opts)


class Workdir:
    """The folder of one run. Checkpoint managers are opened on first use, one per name."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self._managers: dict[str, ocp.CheckpointManager] = {}

    def checkpoints(self, name: str) -> ocp.CheckpointManager:
        if name not in self._managers:
            self._managers[name] = checkpoint_manager(self.path / "checkpoints" / name)
        return self._managers[name]

    def latest_step(self, name: str) -> int | None:
        return self.checkpoints(name).latest_step()

    def save(self, name: str, step: int, state, meta: dict) -> None:
        """Saves (and waits for) checkpoint ``name`` at ``step``, replacing the previous one."""
        manager = self.checkpoints(name)
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                     force=True)
        manager.wait_until_finished()

    def restore(self, name: str, target) -> tuple[dict, dict]:
        """(state, meta) of checkpoint ``name``, shaped like ``target`` (arrays or ShapeDtypeStructs)."""
        manager = self.checkpoints(name)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    def refuse_other_experiment(self, cfg: ml_collections.ConfigDict) -> None:
        """Refuses a workdir that holds another experiment's checkpoints."""
        path = self.path / "config.json"
        if not path.is_file() or not (self.path / "checkpoints").exists():
            return
        previous, now = _flatten(json.loads(path.read_text())), _flatten(json.loads(cfg.to_json()))
        differ = sorted(k for k in set(previous) | set(now)
                        if previous.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
        if differ:
            raise ValueError(
                f"workdir {self.path} holds checkpoints of a different experiment (differs in: "
                + ", ".join(f"{k}: {previous.get(k)!r} there vs {now.get(k)!r} now" for k in differ[:6])
                + "). Use a new --workdir, or delete that one to start over.")

    def record_config(self, cfg: ml_collections.ConfigDict) -> None:
        """Writes config.json; call it once the run is known to start, so a refused run leaves nothing."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / "config.json", json.loads(cfg.to_json()), sort_keys=True)

    def write_json(self, name: str, obj, indent: int = 2) -> None:
        write_json(self.path / name, obj, indent)

    def write_npz(self, name: str, arrays: dict) -> None:
        """Writes ``name`` (numpy arrays) whole or not at all."""
        tmp = self.path / (name + ".tmp")
        with tmp.open("wb") as f:
            np.savez(f, **arrays)
        tmp.rename(self.path / name)

    def preempted(self, step: int) -> Preempted:
        return Preempted(f"[preempted] SIGTERM at step {step}: saved {self.path / 'checkpoints' / 'latest'}; "
                         "rerun the same command to continue")


@contextlib.contextmanager
def sigterm_flag() -> Iterator[dict]:
    """Yields ``stop``; ``stop["signal"]`` is set when SIGTERM arrives, so a loop can save at the end of its
    current step and raise ``Workdir.preempted``. Handled in the main thread only (elsewhere the flag never
    rises); the previous handler is restored on exit."""
    stop = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)
