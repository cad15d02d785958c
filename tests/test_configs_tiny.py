"""Each family's `configs/*.py:tiny` variant is a valid CPU-sized experiment (built abstractly: no training)."""
import importlib.util
import pathlib

import pytest
from flax import nnx

from peft_jax.adapters import apply_peft, param_report, trainable_filter
from peft_jax.config import check_config_keys
from peft_jax.models import create_model
from peft_jax.names import check_names, model_family

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = {"vit_b_lora.py": "vit", "resnet50_ssf.py": "cnn", "efficientnet_lite0_ssf.py": "cnn"}


def load(file: str, arg: str | None):
    spec = importlib.util.spec_from_file_location(file.removesuffix(".py"), ROOT / "configs" / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("file", sorted(TINY))
def test_tiny_variant_is_a_small_valid_run(file):
    full, tiny = load(file, None), load(file, "tiny")
    check_config_keys(tiny, f"configs/{file}:tiny")
    check_names(tiny)
    assert model_family(tiny.model.name) == TINY[file]
    assert tiny.model.name == ("resnet18" if file == "resnet50_ssf.py" else full.model.name)
    assert tiny.peft.method == full.peft.method and tiny.train.lr == full.train.lr
    assert tiny.train.num_steps <= 40 < full.train.num_steps and tiny.model.image_size <= 32
    m = tiny.model
    options = {"patch_size": m.patch_size, "depth": m.depth} if TINY[file] == "vit" else {}
    model = nnx.eval_shape(lambda: apply_peft(create_model(m.name, num_classes=2, image_size=m.image_size,
                                                            rngs=nnx.Rngs(0), **options), tiny.peft))
    report = param_report(model, trainable_filter(tiny.peft))
    assert 0 < report["trainable_params"] < report["total_params"]


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match=r"configs/resnet50_ssf.py:small is unknown; valid: tiny"):
        load("resnet50_ssf.py", "small")
