"""benchmarks/scaling.py's section: every table row has its header's columns, dry runs are marked, and the
peak estimate counts outputs written into donated arguments once."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _scaling():
    spec = importlib.util.spec_from_file_location("scaling", ROOT / "benchmarks" / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _memory(argument, temp):
    return {"argument_size_in_bytes": argument, "output_size_in_bytes": 30, "alias_size_in_bytes": 20,
            "temp_size_in_bytes": temp}


def _result(scaling):
    size = [{"model": "vit_ti16", "measured": True, "median_s": 0.5, "images_per_s": 16.0, "peak_rss_bytes": 1e9,
             "total_params": 5_598_530, "trainable_params": 74_114, "trainable_percent": 1.32, "compile_s": 2.0,
             "memory_analysis": _memory(100, 400)},
            {"model": "vit_h14", "measured": False, "total_params": 632_078_082, "trainable_params": 1_313_282,
             "trainable_percent": 0.21, "compile_s": 15.0, "memory_analysis": _memory(2000, 8000)}]
    mesh = [{"model": model, "num_devices": n, "frozen_bytes_per_device": 800 // n,
             "trainable_bytes_per_device": 10, "optimizer_bytes_per_device": 80 // n,
             "memory_analysis": _memory(1000 // n, 400 // n)}
            for model in scaling.MESH_MODELS for n in scaling.DEVICE_COUNTS]
    env = {"date": "2026-12-04", "cpu": "test CPU", "cores": 2, "python": "3.11", "jax": "0.10.2", "flax": "0.12.8",
           "allocator": "tcmalloc"}
    return {"size": size, "mesh": mesh, "warmup": 2, "steps": 5, "environment": env, "load_before": 2.0,
            "load_after": 2.5, "wall_s": 60.0, "lora": {"rank": 8, "alpha": 8.0, "targets": "qv"}}


def test_peak_estimate_counts_donated_outputs_once():
    assert _scaling().peak_estimate(_memory(100, 50)) == 100 + 30 - 20 + 50


def test_section_rows_match_their_headers_and_mark_dry_runs():
    scaling = _scaling()
    text = scaling.markdown(_result(scaling), "python benchmarks/scaling.py")
    tables = [block.splitlines() for block in text.split("\n\n") if block.startswith("| model |")]
    assert [len(t) - 2 for t in tables] == [2, len(scaling.MESH_MODELS) * len(scaling.DEVICE_COUNTS)]
    for table in tables:
        assert {row.count("|") for row in table} == {table[0].count("|")}
    dry = next(row for row in tables[0] if row.startswith("| vit_h14 "))
    assert "| dry run |" in dry and "632,078,082" in dry
    assert "shared with other jobs" in text
    assert "frozen bytes per device fall 8.00x" in text
