"""PyTorch peft adapters (LoRA with rsLoRA, DoRA, IA3) for a transformers ViT: into peft_jax and back out.

torch -> peft_jax: the same logits as peft to 1e-4; one fine-tuning step in JAX; peft_jax -> torch:
the exported folder loads into PyTorch peft with the JAX model's logits.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from peft_jax.adapters import apply_peft, trainable_filter
from peft_jax.adapters.export_hf import export_hf
from peft_jax.adapters.import_hf import load_hf_adapter, peft_config_from_hf
from peft_jax.config import base_config
from peft_jax.models import from_pretrained
from peft_jax.testing import randomize_torch as randomize
from peft_jax.train import builder

TOL = dict(rtol=1e-4, atol=1e-4)
X = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
LABELS = jnp.asarray([0, 1, 2, 1])


def base_vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768,
                       image_size=32, patch_size=8, num_labels=3, layer_norm_eps=1e-6)
    return randomize(ViTForImageClassification(config), std=0.1).eval()


def peft_configs():
    from peft import IA3Config, LoraConfig

    return {
        "lora": LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "fc1"], use_rslora=True,
                           modules_to_save=["classifier"]),
        "dora": LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "o_proj", "fc2"], use_dora=True,
                           modules_to_save=["classifier"]),
        "ia3": IA3Config(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"],
                         modules_to_save=["classifier"]),
    }


def torch_logits(model, x=X):
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).logits.numpy()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "vit"
    base_vit().save_pretrained(path)
    return path


def torch_adapter(kind, folder):
    """A PyTorch peft adapter with every adapter tensor moved off its init, saved to `folder`."""
    from peft import get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(base_vit(), peft_configs()[kind])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape))
    model.eval().save_pretrained(folder)
    return model


@pytest.mark.parametrize("kind,scan", [("lora", False), ("lora", True), ("dora", False), ("ia3", False)])
def test_torch_adapter_into_peft_jax_and_back(kind, scan, base_dir, tmp_path):
    from peft import PeftModel

    ref = torch_adapter(kind, tmp_path / "torch")
    want = torch_logits(ref)
    assert not np.allclose(want, torch_logits(base_vit()), atol=1e-2)  # the adapter matters

    cfg = peft_config_from_hf(tmp_path / "torch")
    model = from_pretrained("vit_ti16", base_dir, scan_layers=scan)
    apply_peft(model, cfg, rngs=nnx.Rngs(0))
    load_hf_adapter(model, tmp_path / "torch", cfg)
    model.eval()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(X))), want, **TOL)

    # One fine-tuning step in JAX, then out to PyTorch peft again.
    filt = trainable_filter(cfg)
    grads = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(jnp.asarray(X)), LABELS).mean(),
                     argnums=nnx.DiffState(0, filt))(model)
    nnx.update(model, jax.tree.map(lambda p, g: p - 0.5 * g, nnx.state(model, filt), grads))
    tuned = np.asarray(model(jnp.asarray(X)))
    assert not np.allclose(tuned, want, atol=1e-3)
    export_hf(model, cfg, tmp_path / "back")
    back = PeftModel.from_pretrained(base_vit(), tmp_path / "back").eval()
    np.testing.assert_allclose(torch_logits(back), tuned, **TOL)


def run_config(base_dir, adapter, **peft):
    c = base_config()
    c.model.name, c.model.image_size = "vit_ti16", 32
    c.init.checkpoint, c.init.adapter = str(base_dir), str(adapter)
    c.peft.update(peft)
    return c


def test_a_run_starts_from_init_adapter(base_dir, tmp_path):
    ref = torch_adapter("lora", tmp_path / "torch")
    settings = peft_config_from_hf(tmp_path / "torch")
    cfg = run_config(base_dir, tmp_path / "torch", method="lora", rank=settings.rank, alpha=settings.alpha,
                     targets=settings.targets)
    built = builder.build(cfg, num_classes=3)
    built.model.eval()
    np.testing.assert_allclose(np.asarray(built.model(jnp.asarray(X))), torch_logits(ref), **TOL)

    with pytest.raises(ValueError, match=r"the adapter is rank=4, alpha=12.0, the run has peft.rank=8, "
                                         r"peft.alpha=8.0; set --config.peft.method=lora --config.peft.rank=4"):
        builder.build(run_config(base_dir, tmp_path / "torch"), num_classes=3)
    with pytest.raises(ValueError, match=r"peft.targets='\(mlp/fc1\|attn/query\|attn/value\)\$' fits"):
        builder.build(run_config(base_dir, tmp_path / "torch", rank=4, alpha=settings.alpha), num_classes=3)
    no_base = run_config(base_dir, tmp_path / "torch", **{k: settings[k] for k in ("rank", "alpha", "targets")})
    no_base.init.checkpoint = None
    with pytest.raises(ValueError, match="init.adapter=.* needs init.checkpoint"):
        builder.build(no_base, num_classes=3)
    with pytest.raises(ValueError, match="not a Hugging Face peft adapter folder"):
        builder.build(run_config(base_dir, tmp_path / "nothing"), num_classes=3)
