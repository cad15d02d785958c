"""``--config.dry_run`` (abstract build, sharding, one compiled train step) for the ViT methods on
ViT-B/16 (every method, one device) and ViT-H/14 (every method, grouped into four compiles of the
scanned model, FSDP over 8 simulated devices), and the block-by-block ViT-B/16; the methods' default
adapter dropout included."""
import pytest

from peft_jax.config import base_config
from peft_jax.train import loop
from test_vit_methods import HEAD, SCANNABLE, VIT_B16_COUNTS


def dry(tmp_path, name, method, scan=True, fsdp=1):
    c = base_config()
    c.model.name, c.model.scan_layers, c.model.remat = name, scan, scan
    c.peft.method = method
    c.train.batch_size = 8
    c.mesh.fsdp = fsdp
    return loop.dry_run(c, tmp_path)


@pytest.mark.parametrize("method", SCANNABLE)
def test_vit_b16_dry_run(tmp_path, method):
    result = dry(tmp_path, "vit_b16", method)
    assert result["trainable_params"] == VIT_B16_COUNTS[method] + HEAD
    assert result["memory_analysis"]


def test_vit_b16_dry_run_unscanned(tmp_path):
    """The block-by-block model (the default for ViT-B) compiles too."""
    result = dry(tmp_path, "vit_b16", "vpt_shallow+fact_tt", scan=False)
    assert result["trainable_params"] == VIT_B16_COUNTS["vpt_shallow"] + VIT_B16_COUNTS["fact_tt"] + HEAD


@pytest.mark.parametrize("method,expected", [
    # ViT-H/14: width 1280, 32 blocks, MLP 5120; 2-class head 2,562
    # VPT-deep 10 tokens, (IA)^3 vectors, DoRA r8 on q, v with magnitudes, head
    ("vpt_deep+ia3+dora", 32 * 10 * 1280 + 32 * (1280 + 1280 + 5120) + 32 * 2 * (2 * 1280 * 8 + 1280) + 2_562),
    ("adaptformer+repadapter+difffit+lora", None),
    ("convpass+attention_tune+adapter_houlsby+adapter_pfeiffer", None),
    # VPT-shallow 10 tokens; FacT-TT r8: shared U, V and 12 cores of 8x8 per block (q, k, v, out: one
    # 1280x1280 block each; fc1, fc2: four each)
    ("vpt_shallow+fact_tt", 10 * 1280 + 2 * 1280 * 8 + 32 * 12 * 8 * 8 + 2_562),
    ("fact_tk+bitfit", None),
])
def test_vit_h14_dry_run(tmp_path, method, expected):
    result = dry(tmp_path, "vit_h14", method, fsdp=8)  # frozen weights FSDP-sharded over 8 devices
    assert result["num_devices"] == 8 and result["frozen_bytes_per_device"] < result["frozen_bytes_total"] / 4
    if expected is not None:
        assert result["trainable_params"] == expected
    assert result["memory_analysis"]
