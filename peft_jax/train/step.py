"""The jitted, sharded train and eval steps.

Pure functions over the state pytrees of a ``TrainState``: the graph definition is closed
over, and the trainable, frozen and other (BatchNorm statistics) states come in as
arguments with explicit shardings. Gradients are taken with respect to the trainable state only, so
no frozen weight is ever differentiated and XLA drops the backward work it would need.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding

from peft_jax.train.state import TrainState


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    onehot = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        onehot = optax.smooth_labels(onehot, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot).mean()


def train_step_fn(graph: nnx.GraphDef, tx: optax.GradientTransformation, label_smoothing: float,
                  skip_nonfinite: bool = False) -> Callable:
    """One optimizer step. With ``skip_nonfinite`` a NaN/Inf loss or gradient leaves every state unchanged."""

    def step(trainable, frozen, rest, opt_state, batch):
        def loss_fn(trainable, frozen, rest):
            # copy=True: fresh variables at this trace level, which BatchNorm may update under grad.
            model = nnx.merge(graph, trainable, frozen, rest, copy=True)
            logits = model(batch["image"])
            loss = cross_entropy(logits, batch["label"], label_smoothing)
            new_rest = nnx.state(model, nnx.Not(nnx.Param))
            return loss, (logits, new_rest)

        (loss, (logits, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, rest)
        updates, new_opt_state = tx.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            new_trainable, new_rest, new_opt_state = (
                keep(new_trainable, trainable), keep(new_rest, rest), keep(new_opt_state, opt_state))
        metrics = {
            "loss": loss,
            "accuracy": (logits.argmax(-1) == batch["label"]).mean(),
            "grad_norm": grad_norm,
            "nonfinite": ~finite,
        }
        return new_trainable, new_rest, new_opt_state, metrics

    return step


def eval_step_fn(graph: nnx.GraphDef) -> Callable:
    def step(trainable, frozen, rest, images):
        return nnx.merge(graph, trainable, frozen, rest)(images)

    return step


@dataclasses.dataclass
class Steps:
    train: Callable  # (trainable, frozen, rest, opt_state, batch) -> (trainable, rest, opt_state, metrics)
    eval: Callable  # (trainable, frozen, rest, images) -> logits


def compile_steps(state: TrainState, train_cfg: ml_collections.ConfigDict) -> Steps:
    """The classification steps of ``state``, jitted with its shardings and donated state buffers."""
    sh, batch_sh = state.shardings, state.batch_sharding
    replicated = NamedSharding(state.mesh, jax.sharding.PartitionSpec())
    train = jax.jit(
        train_step_fn(state.graph_train, state.tx, train_cfg.label_smoothing, train_cfg.get("skip_nonfinite", False)),
        in_shardings=(sh["trainable"], sh["frozen"], sh["rest"], sh["opt_state"], {"image": batch_sh, "label": batch_sh}),
        out_shardings=(sh["trainable"], sh["rest"], sh["opt_state"], replicated),
        donate_argnums=(0, 2, 3),
    )
    evaluate = jax.jit(
        eval_step_fn(state.graph_eval),
        in_shardings=(sh["trainable"], sh["frozen"], sh["rest"], batch_sh),
        out_shardings=replicated,
    )
    return Steps(train, evaluate)
