"""model.remat_policy: what a rematerialised block keeps changes memory and time, never the gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from peft_jax.config import base_config
from peft_jax.errors import UserError
from peft_jax.models.vit import REMAT_POLICIES
from peft_jax.train import builder


def lora_loss(remat: bool, policy: str | None, scan: bool = False):
    """(loss of the trainable state, that state) for a tiny LoRA ViT with random weights from numpy (no init
    programs to compile); the trainable ones too: at their zero init (head kernel, LoRA B) no gradient would
    reach the blocks."""
    cfg = base_config()
    cfg.model.update(name="vit_ti16", image_size=32, patch_size=8, depth=1, scan_layers=scan, remat=remat,
                     remat_policy=policy)
    built = builder.build_abstract(cfg, 3)
    graph, *abstract = nnx.split(built.model, built.trainable, ...)
    rng = np.random.default_rng(0)
    trainable, rest = (jax.tree.map(lambda x: jnp.asarray(0.1 * rng.normal(size=x.shape), x.dtype), a)
                       for a in abstract)
    images = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
    labels = jnp.array([0, 1, 2, 1])

    def loss(t):
        logits = nnx.merge(graph, t, rest)(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return loss, trainable


@pytest.mark.parametrize("policy, scan", [*(pytest.param(p, False, id=p) for p in REMAT_POLICIES),
                                          pytest.param("projections_saveable", True, id="projections_saveable-scan")])
def test_policy_gives_the_gradients_without_remat(policy, scan):
    """Each policy on unrolled blocks, the names policy on scanned ones too; the step with and without remat
    in one program (one compilation)."""
    (plain, a), (remat, b) = lora_loss(False, None, scan), lora_loss(True, policy, scan)
    reference, grads = jax.jit(lambda a, b: (jax.grad(plain)(a), jax.grad(remat)(b)))(a, b)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(reference)) > 1e-3  # the blocks get gradients
    for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_unset_policy_is_todays_whole_block_remat():
    """None (the default) and nothing_saveable trace to the same program: jax.checkpoint without a policy."""
    traced = [str(jax.make_jaxpr(jax.grad(loss))(t)) for loss, t in (lora_loss(True, None),
                                                                     lora_loss(True, "nothing_saveable"))]
    assert traced[0] == traced[1]


def test_unknown_policy_is_refused_with_the_valid_names():
    cfg = base_config()
    cfg.model.update(name="vit_ti16", image_size=32, patch_size=8, depth=1, remat=True, remat_policy="dots_savable")
    with pytest.raises(UserError, match="model.remat_policy .*" + ", ".join(REMAT_POLICIES)) as refused:
        builder.build(cfg, 2)
    assert "\n" not in str(refused.value)


def test_a_policy_without_remat_is_refused():
    """Without model.remat the policy would change nothing: one error naming both fields, not a silent no-op."""
    cfg = base_config()
    cfg.model.update(name="vit_ti16", image_size=32, patch_size=8, depth=1, remat_policy="dots_saveable")
    with pytest.raises(UserError, match=r"model.remat_policy=dots_saveable needs model.remat=True"):
        builder.build(cfg, 2)


@pytest.mark.parametrize("method,remat,policy,expected", [
    ("lora", None, None, (True, "projections_saveable")),  # both unset: LoRA's measured default
    ("vpt_deep", None, None, (True, "projections_saveable")),
    ("ssf", None, None, (False, None)),  # measured: 1.29-1.36x the step time for 1-4% less memory
    ("full", None, None, (False, None)),  # not measured that way: every activation kept
    ("lora", False, None, (False, None)),  # an explicit choice wins
    ("lora", True, None, (True, None)),  # remat alone: the whole block, as before
    ("full", True, "dots_saveable", (True, "dots_saveable")),
])
def test_unset_remat_takes_the_methods_measured_default(method, remat, policy, expected):
    cfg = base_config()
    cfg.model.update(name="vit_ti16", image_size=32, patch_size=8, depth=1, remat=remat, remat_policy=policy)
    cfg.peft.method = method
    model = builder.build_abstract(cfg, 3).model
    assert (model.config.remat, model.config.remat_policy) == expected


def test_a_run_may_continue_with_remat_changed():
    """remat changes memory and time, not the experiment: a workdir's checkpoints stay usable across it."""
    from peft_jax.train.workdir import differences, experiment_identity

    before, after = base_config(), base_config()
    after.model.update(remat=True, remat_policy="dots_saveable")
    assert differences(experiment_identity(before), experiment_identity(after)) == []
    after.model.depth = 2
    assert differences(experiment_identity(before), experiment_identity(after)) == ["model.depth"]
