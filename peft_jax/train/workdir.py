"""A run's home on disk: the experiment record, checkpoints, a lock, preemption and atomic outputs.

Every kind of run (classification, text-to-image, a sweep trial, a grid cell) keeps its state in one
``Workdir``:

    config.json               the full config; a rerun of another experiment is refused
    run.lock                  the process running in it (pid, host); a second process is refused
    checkpoints/<name>/<step> orbax, one per name (``latest`` to resume, ``best`` by validation)
    nonfinite.json            written when a run stopped on a NaN/Inf: its fixes may then change
    *.json, *.npz             results written atomically (temporary file, then rename)

A checkpoint is a state pytree plus a JSON ``meta`` dict (step, early-stopping state, losses). Once
``bind`` has named the experiment and its base weights, every checkpoint carries both in its ``meta``
and is refused on restore by another experiment or onto other base weights, so a lost or edited
config.json cannot make a run resume onto the wrong backbone.

Writes that fail on the disk (full, read-only) and checkpoints that cannot be read back raise
``WorkdirError``, a ``UserError`` the launchers print as one ``error:`` line naming the folder.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from peft_jax.errors import UserError

# Fields that may change between a run and its continuation without making it another experiment: they
# decide how long to run, how often to report or save and where the data is, never what a step computes.
RESUMABLE_CHANGES = ("train.num_steps", "train.progress", "train.log_every", "train.checkpoint_every",
                     "train.eval_every", "dataset.num_workers", "dataset.download", "dataset.data_dir",
                     "dataset.manual_dir", "mesh.data", "mesh.fsdp", "mesh.min_shard_size",
                     # how the run is spread over hosts: each process has its own process_id, and a
                     # relaunch may get another coordinator port; the losses are the same (the two-process test)
                     "distributed.enabled", "distributed.coordinator_address", "distributed.num_processes",
                     "distributed.process_id",
                     # what the backward pass recomputes: memory and time only, the same function and gradients
                     # (a run that ran out of memory may continue with remat on)
                     "model.remat", "model.remat_policy")
# The fixes a NaN/Inf stop advises. After such a stop they may change, and the run then starts over from
# step 0: the last checkpoint may already hold the overflowing weights (the check lags one step behind
# the update), and a run that used one learning rate before its checkpoint and another after it would be
# neither experiment.
NONFINITE_FIXES = ("train.lr", "train.lr_mults", "train.warmup_steps", "train.grad_clip", "train.skip_nonfinite")
NONFINITE_MARK = "nonfinite.json"
LOCK_FILE = "run.lock"
STAMP = ("base_hash", "experiment")  # what ``bind`` adds to every checkpoint's meta


class Preempted(Exception):
    """SIGTERM arrived; the latest state was saved (launch scripts exit with 143)."""


class WorkdirError(UserError):
    """The workdir cannot be written (full disk, read-only), read back (a corrupted checkpoint) or used
    (another process runs in it); the message names the folder and the way out."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def experiment_identity(cfg: ml_collections.ConfigDict) -> dict:
    """The flattened config without the fields a continuation may change: what a checkpoint belongs to."""
    return {k: v for k, v in _flatten(json.loads(cfg.to_json())).items() if k not in RESUMABLE_CHANGES}


def differences(previous: dict, now: dict) -> list[str]:
    """The experiment fields (flattened keys) in which two configs differ."""
    return sorted(k for k in set(previous) | set(now) if previous.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)


def _describe(previous: dict, now: dict, keys: list[str]) -> str:
    return ", ".join(f"{k}: {previous.get(k)!r} there vs {now.get(k)!r} now" for k in keys[:6])


@contextlib.contextmanager
def writing(folder: pathlib.Path) -> Iterator[None]:
    """Turns an OSError of a write under ``folder`` (full disk, read-only, no permission) into a WorkdirError."""
    try:
        yield
    except OSError as e:
        raise WorkdirError(f"cannot write in {folder}: {e.strerror or e} ({getattr(e, 'filename', None) or folder}). "
                           "Free space there or make it writable, then rerun the same command: it continues "
                           "from the last complete checkpoint") from e


def _reason(e: BaseException) -> str:
    """The disk's own words for a failure (TensorStore wraps them in long status messages)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    code = re.search(r"os_error_code='?(\d+)", str(e))
    return os.strerror(int(code.group(1))) if code else str(e).splitlines()[0][:300]


def _io_failure(e: BaseException) -> bool:
    """An error of the disk under orbax: an OSError, or a TensorStore status naming one."""
    text = str(e)
    return isinstance(e, OSError) or "os_error_code" in text or text.startswith(
        ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAVAILABLE", "DATA_LOSS", "ABORTED"))


ORBAX_LOGGERS = ("absl", "asyncio", "concurrent.futures")


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Orbax logs each failed save thread's traceback at ERROR; the failure is raised (and reported) anyway."""
    if os.environ.get("PEFT_JAX_DEBUG"):
        yield
        return
    loggers = [logging.getLogger(n) for n in ORBAX_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _silence_failed_save() -> None:
    """After a failed save, orbax's leftover threads and futures report the same disk error again for a
    while (tracebacks after the run's one error line); the run is ending, so they stay quiet."""
    if not os.environ.get("PEFT_JAX_DEBUG"):
        for name in ORBAX_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)


def write_json(path: pathlib.Path, obj, indent: int = 2, sort_keys: bool = False) -> None:
    """Writes ``path`` whole or not at all: a temporary file renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    with writing(path.parent):
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


def _proc_stat(pid: int) -> list[str] | None:
    """The fields after the command name in /proc/PID/stat (state first), None without /proc or process."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _owner_alive(owner: dict) -> bool:
    """Whether the process a lock file names still runs: dead, a zombie or a reused PID (another start time)
    on this host is stale; a process on another host is taken to run."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = int(owner.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True
    return stat[0] not in ("Z", "X") and owner.get("start") in (None, stat[19])


def _in_use(lock: pathlib.Path, owner: dict) -> WorkdirError:
    return WorkdirError(
        f"workdir {lock.parent} is in use by process {owner.get('pid')} on host {owner.get('host')} (since "
        f"{owner.get('since', '?')}): wait for it to end or use another --workdir. If that process is gone, "
        f"delete {lock}")


def acquire_lock(folder: pathlib.Path) -> int:
    """Takes ``folder/run.lock`` for this process and returns its descriptor (hold it open for the run).

    ``flock`` makes the kernel arbitrate between live processes and release the lock of a killed one; the
    file's pid and host name the holder in the refusal, and a lock whose holder is gone is taken over.
    """
    lock = folder / LOCK_FILE
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(lock, _read_owner(fd)) from None
        owner = _read_owner(fd)
        if owner and owner.get("pid") != os.getpid() and _owner_alive(owner):
            raise _in_use(lock, owner)
        if os.fstat(fd).st_ino != os.stat(lock).st_ino:  # released (unlinked) while we waited: take the new one
            os.close(fd)
            return acquire_lock(folder)
        start = (_proc_stat(os.getpid()) or [None] * 20)[19]
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": start,
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        with writing(folder):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _read_owner(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}


def release_lock(folder: pathlib.Path, fd: int, remove_folder: bool) -> None:
    """Removes the lock, and with ``remove_folder`` the workdir if the run left nothing else in it."""
    with contextlib.suppress(OSError):
        (folder / LOCK_FILE).unlink()
        if remove_folder:
            folder.rmdir()  # only when empty: a run refused before writing anything leaves no folder
    os.close(fd)


class Workdir:
    """The folder of one run. Checkpoint managers are opened on first use, one per name."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self._managers: dict[str, ocp.CheckpointManager] = {}
        self.stamp: dict = {}

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Holds ``run.lock`` for the run (see ``acquire_lock``); released on any exit but SIGKILL, whose
        stale lock the next run takes over."""
        created = not self.path.exists()
        fd = acquire_lock(self.path)
        try:
            yield
        finally:
            release_lock(self.path, fd, created)

    def bind(self, cfg: ml_collections.ConfigDict, base_hash: str | None) -> None:
        """Names the experiment and its base weights: saved into every checkpoint, checked on restore."""
        self.stamp = {"base_hash": base_hash, "experiment": experiment_identity(cfg)}

    def folder(self, name: str, step: int | None = None) -> pathlib.Path:
        folder = self.path / "checkpoints" / name
        return folder if step is None else folder / str(step)

    def checkpoints(self, name: str) -> ocp.CheckpointManager:
        if name not in self._managers:
            with writing(self.folder(name)):
                self._managers[name] = checkpoint_manager(self.folder(name))
        return self._managers[name]

    def latest_step(self, name: str) -> int | None:
        """The step of checkpoint ``name``; None when there is none (the folder is not created by asking)."""
        if name not in self._managers and not self.folder(name).is_dir():
            return None
        return self.checkpoints(name).latest_step()

    def has_checkpoints(self) -> bool:
        return any(self.latest_step(p.name) is not None for p in (self.path / "checkpoints").glob("*") if p.is_dir())

    def save(self, name: str, step: int, state, meta: dict) -> None:
        """Saves (and waits for) checkpoint ``name`` at ``step``, replacing the previous one (and any earlier
        save of the same step)."""
        manager = self.checkpoints(name)
        self._refuse_full_disk(name, step, state)
        with _quiet_orbax():
            try:
                if step in manager.all_steps():
                    manager.delete(step)
                manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                           meta=ocp.args.JsonSave({**meta, **self.stamp})), force=True)
                manager.wait_until_finished()
                return
            except Exception as e:
                if not _io_failure(e):
                    raise
                failure = e
            with contextlib.suppress(Exception):
                self._managers.pop(name).close()
        _silence_failed_save()
        raise WorkdirError(f"cannot write checkpoint {self.folder(name, step)}: {_reason(failure)}. Free space there "
                           "or make it writable, then rerun the same command: it continues from the last complete "
                           "checkpoint") from failure

    def _refuse_full_disk(self, name: str, step: int, state) -> None:
        """Refuses a save that cannot fit before orbax starts it: a save that fails half-way leaves its
        threads printing tracebacks after the error (orbax 0.12)."""
        need = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state)) + (1 << 15)
        with writing(self.folder(name)):
            free = shutil.disk_usage(self.folder(name)).free
        if free < need:
            _silence_failed_save()
            raise WorkdirError(f"cannot write checkpoint {self.folder(name, step)}: No space left on device ({free} "
                               f"bytes free, it needs about {need}). Free space there, then rerun the same command: "
                               "it continues from the last complete checkpoint")

    def _read(self, name: str, args: dict) -> dict:
        manager = self.checkpoints(name)
        step = manager.latest_step()
        try:
            with _quiet_orbax():
                return manager.restore(step, args=ocp.args.Composite(**args))
        except (OSError, ValueError) as e:
            reason = e
        except Exception as e:  # TensorStore's read errors are bare Exceptions
            if type(e) is not Exception:
                raise
            reason = e
        raise WorkdirError(
            f"checkpoint {self.folder(name, step)} cannot be read ({_reason(reason)[:200]}): delete that "
            "folder and rerun the same command (it then continues from the other checkpoint, or starts over)"
        ) from reason

    def _checked(self, name: str, meta: dict) -> dict:
        """``meta`` without the stamp, refused when it names another experiment or other base weights."""
        meta = dict(meta)
        stored = {k: meta.pop(k) for k in STAMP if k in meta}
        where = self.folder(name, meta.get("step"))
        if self.stamp and stored.get("base_hash") and stored["base_hash"] != self.stamp["base_hash"]:
            raise WorkdirError(
                f"checkpoint {where} was trained on other base weights (hash {stored['base_hash'][:12]}... there, "
                f"{str(self.stamp['base_hash'])[:12]}... now): init.checkpoint or the model's weights changed. Restore "
                f"the weights it was trained on, or use another --workdir (or delete {self.path} to start over)")
        if self.stamp and "experiment" in stored:
            differ = differences(stored["experiment"], self.stamp["experiment"])
            if differ:
                raise WorkdirError(
                    f"checkpoint {where} belongs to a different experiment (differs in: "
                    f"{_describe(stored['experiment'], self.stamp['experiment'], differ)}). Use another --workdir, "
                    f"or delete {self.path} to start over")
        return meta

    def meta(self, name: str) -> dict:
        """The meta of checkpoint ``name`` (checked against ``bind``), without reading its arrays."""
        return self._checked(name, self._read(name, {"meta": ocp.args.JsonRestore()}).meta)

    def restore(self, name: str, target) -> tuple[dict, dict]:
        """(state, meta) of checkpoint ``name``, shaped like ``target`` (arrays or ShapeDtypeStructs)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self._read(name, {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()})
        return out.state, self._checked(name, out.meta)

    def delete(self, name: str) -> None:
        """Removes checkpoint ``name`` (every step of it)."""
        manager = self._managers.pop(name, None)
        if manager is not None:
            manager.close()
        if self.folder(name).exists():
            with writing(self.path):
                shutil.rmtree(self.folder(name))

    def refuse_other_experiment(self, cfg: ml_collections.ConfigDict) -> list[str]:
        """Refuses a workdir that holds another experiment's checkpoints. Returns the NaN fixes that changed
        after a non-finite stop (``NONFINITE_FIXES``): the run then starts over (``record_config``).

        A folder without any checkpoint step (a run refused or failed before its first save) blocks nothing.
        """
        path = self.path / "config.json"
        if not path.is_file():
            return []
        try:
            previous = _flatten(json.loads(path.read_text()))
        except ValueError as e:
            if not self.has_checkpoints():
                return []
            raise WorkdirError(f"{path} is not valid JSON ({e}); delete it to continue (the checkpoints name "
                               "their experiment themselves)") from e
        now = _flatten(json.loads(cfg.to_json()))
        differ = differences(previous, now)
        if differ and set(differ) <= set(NONFINITE_FIXES) and (self.path / NONFINITE_MARK).is_file():
            return differ
        if differ and self.has_checkpoints():
            raise WorkdirError(
                f"workdir {self.path} holds checkpoints of a different experiment (differs in: "
                f"{_describe(previous, now, differ)}). Use a new --workdir, or delete that one to start over.")
        return []

    def record_config(self, cfg: ml_collections.ConfigDict, start_over: list[str] | tuple = ()) -> None:
        """Writes config.json; call it once the run is known to start, so a refused run leaves nothing.

        With ``start_over`` (the NaN fixes that changed) the previous run's checkpoints and logs go first.
        """
        if start_over:
            print(f"[restart] {self.path}: the previous run stopped on a non-finite loss and "
                  f"{', '.join(start_over)} changed: starting over from step 0")
            for name in [p.name for p in (self.path / "checkpoints").glob("*")]:
                self.delete(name)
            with writing(self.path):
                shutil.rmtree(self.path / "tb", ignore_errors=True)
                for leftover in ("metrics.jsonl", NONFINITE_MARK):
                    (self.path / leftover).unlink(missing_ok=True)
        with writing(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / "config.json", json.loads(cfg.to_json()), sort_keys=True)

    def write_json(self, name: str, obj, indent: int = 2) -> None:
        write_json(self.path / name, obj, indent)

    def write_npz(self, name: str, arrays: dict) -> None:
        """Writes ``name`` (numpy arrays) whole or not at all."""
        tmp = self.path / (name + ".tmp")
        with writing(self.path):
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
