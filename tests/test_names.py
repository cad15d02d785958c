"""peft_jax.names: the cheap name tables agree with the registries, and each message names the fix."""
import subprocess
import sys

import pytest

from peft_jax import names
from peft_jax.config import base_config


def _cfg(model="vit_b16", method="lora", dataset="breastmnist"):
    c = base_config()
    c.model.name, c.peft.method, c.dataset.name = model, method, dataset
    return c


def test_tables_match_the_registries():
    from peft_jax.adapters import METHODS
    from peft_jax.data import builders, medmnist
    from peft_jax.models.vit import VIT_VARIANTS

    assert names.VIT_NAMES == tuple(VIT_VARIANTS)
    assert {n: m.archs for n, m in METHODS.items()} == names.METHOD_FAMILIES
    single_label = {n for n, info in medmnist.INFO.items() if not info.get("multi_label")}
    assert set(names.MEDMNIST_NAMES) == single_label and "chestmnist" not in names.DATASET_NAMES
    assert names.BUILDER_NAMES == tuple(builders.BUILDERS)


def test_check_names_imports_no_jax():
    code = "import sys; from peft_jax.names import check_names; print(sorted(m for m in ('jax', 'flax', " \
           "'tensorflow_datasets', 'grain') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_method_lists_only_the_family():
    with pytest.raises(ValueError, match=r"for ViT models 'lorra'\. Did you mean lora, ") as e:
        names.check_names(_cfg(method="lorra"))
    assert "svdiff" not in str(e.value) and "bn_tune" not in str(e.value) and "vpt_deep" in str(e.value)
    with pytest.raises(ValueError, match=r"for CNN \(ResNet, EfficientNet-Lite\) models 'sff'\. Did you mean ssf") as e:
        names.check_names(_cfg(model="efficientnet_lite0", method="bitfit+sff"))
    assert "lora," not in str(e.value) and "tsa" in str(e.value)


def test_method_of_another_family():
    with pytest.raises(ValueError, match=r"'tsa' applies to CNN \(ResNet, EfficientNet-Lite\) models, not ViT; "
                                         r"valid names for ViT models: adapter_houlsby"):
        names.check_names(_cfg(method="tsa"))
    with pytest.raises(ValueError, match=r"'svdiff' applies to U-Net models, not CNN"):
        names.check_names(_cfg(model="resnet50", method="svdiff"))


def test_unknown_model_and_dataset_suggest():
    with pytest.raises(ValueError, match=r"unknown model \(model.name\) 'resnet05'\. Did you mean resnet50"):
        names.check_names(_cfg(model="resnet05"))
    with pytest.raises(ValueError, match=r"unknown dataset \(dataset.name\) 'breastmnst'\. Did you mean breastmnist"):
        names.check_names(_cfg(dataset="breastmnst"))
    with pytest.raises(ValueError, match=r"'chestmnist' is multi-label .* Valid names: .*busi") as e:
        names.check_names(_cfg(dataset="chestmnist"))
    assert "chestmnist," not in str(e.value)
    names.check_names(_cfg(model="efficientnet_lite0", method="ssf+bn_tune", dataset="busi"))
