"""Several named adapters, each with its own head, on one backbone (one adapter per dataset).

The surgery is done once; an adapter is then only its trainable state (and any BatchNorm
statistics) plus a head. ``switch`` swaps those in place, so the frozen backbone is never
rebuilt or copied, and a jitted step for one adapter serves every adapter with the same head
size (same graph, other state).
"""
from __future__ import annotations

import pathlib

import jax
import ml_collections
from flax import nnx
from safetensors.numpy import load_file

from peft_jax.adapters.core import HEAD_PATTERN, path_regex, trainable_filter
from peft_jax.adapters.io import ADAPTER_FILE, load_adapter


class AdapterBank:
    """Named (adapter state, head) pairs for one model that already carries the method's surgery."""

    def __init__(self, model: nnx.Module, peft_config: ml_collections.ConfigDict, *, base_hash: str | None = None):
        self.model = model
        self.peft_config = peft_config
        self.base_hash = base_hash
        self.trainable = trainable_filter(peft_config)
        self.body = nnx.Any(nnx.All(self.trainable, nnx.Not(path_regex(HEAD_PATTERN))), nnx.BatchStat)
        self._init = self._snapshot()  # the surgery's initial adapter, the start of a new one
        self.states: dict[str, nnx.State] = {}
        self.heads: dict[str, nnx.Linear] = {}
        self.active: str | None = None

    @property
    def names(self) -> list[str]:
        return sorted(self.states)

    def _snapshot(self) -> nnx.State:
        """A copy of the adapter state (``nnx.state`` alone returns the model's live variables)."""
        return jax.tree.map(lambda x: x, nnx.state(self.model, self.body))

    def _stash(self) -> None:
        """Keeps what training did to the active adapter before another one takes its place."""
        if self.active is not None:
            self.states[self.active] = self._snapshot()

    def add(self, name: str, num_classes: int, *, rngs: nnx.Rngs) -> None:
        """A new adapter at the surgery's initialisation with a fresh ``num_classes`` head; makes it active."""
        if name in self.states:
            raise ValueError(f"adapter {name!r} already exists; adapters: {self.names}")
        old = self.model.head
        self._stash()
        self.states[name] = self._init
        self.heads[name] = nnx.Linear(old.in_features, num_classes, dtype=old.dtype, rngs=rngs,
                                      kernel_init=nnx.initializers.zeros)
        self.switch(name)

    def load(self, name: str, directory: str | pathlib.Path) -> dict:
        """Adds the adapter saved in ``directory`` (``save_adapter``); checks base hash and PEFT config."""
        if name in self.states:
            raise ValueError(f"adapter {name!r} already exists; adapters: {self.names}")
        kernel = load_file(str(pathlib.Path(directory) / ADAPTER_FILE)).get("params/head/kernel")
        if kernel is None:
            raise ValueError(f"{directory}: the adapter file has no head (params/head/kernel)")
        previous = self.active
        self.add(name, kernel.shape[-1], rngs=nnx.Rngs(0))
        try:
            return load_adapter(self.model, directory, self.trainable, base_hash=self.base_hash,
                                peft_config=self.peft_config)
        except ValueError:
            del self.states[name], self.heads[name]
            self.active = None
            if previous is not None:
                self.switch(previous)
            raise

    def switch(self, name: str) -> None:
        """Makes ``name`` the model's adapter and head."""
        if name not in self.states:
            raise KeyError(f"no adapter {name!r}; adapters: {self.names}")
        self._stash()
        nnx.update(self.model, self.states[name])
        self.model.head = self.heads[name]
        self.active = name

    def remove(self, name: str) -> None:
        if name not in self.states:
            raise KeyError(f"no adapter {name!r}; adapters: {self.names}")
        del self.states[name], self.heads[name]
        if self.active == name:
            self.active = None
            if self.states:
                self.switch(self.names[0])
