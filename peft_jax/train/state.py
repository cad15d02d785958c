"""``TrainState``: a model split by its trainable filter, placed on a mesh, with its optimizer state.

The one set-up shared by every run (classification, dry runs, text-to-image, the tests):
``setup(cfg, model, trainable, mesh)`` splits the model into trainable / frozen / other state (the
filter of DESIGN.md), builds the optimizer over the trainable state only, derives the shardings from
the config's rules and puts every tree on the mesh. For an abstract model (``nnx.eval_shape``) the
states stay shapes, so a step can be lowered and compiled without allocating anything.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from peft_jax import sharding as shd
from peft_jax.adapters.core import Filter
from peft_jax.train import optim


@dataclasses.dataclass
class TrainState:
    graph_train: nnx.GraphDef
    graph_eval: nnx.GraphDef
    trainable: nnx.State
    frozen: nnx.State
    rest: nnx.State  # BatchNorm statistics and other non-parameter state
    opt_state: Any
    tx: optax.GradientTransformation
    shardings: dict[str, Any]  # a tree of NamedShardings per state: trainable, frozen, rest, opt_state
    mesh: Mesh

    # What a checkpoint holds: the frozen backbone is rebuilt from the seed or init.checkpoint.
    SAVED = ("trainable", "rest", "opt_state")

    @property
    def batch_sharding(self) -> NamedSharding:
        return shd.batch_sharding(self.mesh)

    def saved(self) -> dict:
        return {k: getattr(self, k) for k in self.SAVED}

    def load(self, trees: dict) -> None:
        """Puts restored trees (any subset of SAVED) in place, each with its sharding."""
        for k, tree in trees.items():
            setattr(self, k, jax.device_put(tree, self.shardings[k]))

    def abstract(self, name: str):
        """ShapeDtypeStructs of one state with its shardings (to lower a step without arrays)."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            getattr(self, name), self.shardings[name])

    def advance(self, train_step, batch: dict) -> dict:
        """One optimizer step of a compiled classification step; returns its metrics."""
        self.trainable, self.rest, self.opt_state, metrics = train_step(
            self.trainable, self.frozen, self.rest, self.opt_state, batch)
        return metrics


def split_model(model: nnx.Module, trainable: Filter, *, freeze_bn_stats: bool = False):
    """(train graph, eval graph, trainable, frozen, rest); the model is left in train mode."""
    model.eval()
    graph_eval, *_ = nnx.split(model, trainable, nnx.Param, ...)
    model.train()
    if freeze_bn_stats:  # PEFT on a pretrained CNN: keep the running statistics as they are
        for _, m in nnx.iter_modules(model):
            if isinstance(m, nnx.BatchNorm):
                m.use_running_average = True
    graph_train, trainable_state, frozen, rest = nnx.split(model, trainable, nnx.Param, ...)
    return graph_train, graph_eval, trainable_state, frozen, rest


def _is_abstract(tree) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def setup(cfg: ml_collections.ConfigDict, model: nnx.Module, trainable: Filter, mesh: Mesh) -> TrainState:
    """The model's TrainState under ``cfg.train`` (optimizer, BatchNorm statistics) and ``cfg.mesh``
    (sharding rules, the size below which variables are replicated)."""
    graph_train, graph_eval, train_state, frozen, rest = split_model(
        model, trainable, freeze_bn_stats=cfg.train.get("bn_stats") == "frozen")
    tx = optim.make_optimizer(cfg.train)
    opt_shape = jax.eval_shape(tx.init, train_state)
    rules, min_size = shd.rules(cfg.mesh), cfg.mesh.min_shard_size
    trees = {"trainable": train_state, "frozen": frozen, "rest": rest, "opt_state": opt_shape}
    shardings = {k: shd.tree_shardings(tree, mesh, min_size, rules) for k, tree in trees.items()}
    state = TrainState(graph_train, graph_eval, train_state, frozen, rest, opt_shape, tx, shardings, mesh)
    if _is_abstract(train_state):
        return state
    state.load({"trainable": train_state, "frozen": frozen, "rest": rest})
    state.opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(state.trainable)
    return state
