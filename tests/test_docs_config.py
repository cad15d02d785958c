"""Every config field the README and docs/*.md name (`train.lr`, `--config.train.lr=...`) exists in a schema.

The schemas: ``base_config()`` (launch/train.py), its ``sweep`` and ``benchmark`` sections, and the
text-to-image config of ``configs/sd15.py`` (launch/train_t2i.py).
"""
import importlib.util
import pathlib
import re

from peft_jax.config import all_keys, base_config
from peft_jax.hpo import benchmark_section, sweep_section

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# `a.b` or `a.b.c` in backticks, optionally as --config.a.b=value; dotted names that are files are not fields.
FIELD = re.compile(r"`(?:--config\.)?([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)(?:=[^`]*)?`")
FILE_SUFFIXES = {"py", "json", "jsonl", "md", "txt", "csv", "npz", "npy", "pth", "pt", "bin", "safetensors", "png",
                 "jpg", "dcm", "db", "ckpt", "so", "sh", "gz", "zip", "tar", "yaml", "toml", "cfg"}


def schema_keys() -> set[str]:
    spec = importlib.util.spec_from_file_location("sd15", ROOT / "configs" / "sd15.py")
    sd15 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sd15)
    keys = set(all_keys(base_config()))
    keys |= {f"sweep.{k}" for k in all_keys(sweep_section())}
    keys |= {f"benchmark.{k}" for k in all_keys(benchmark_section("lora", "vit_b16", "breastmnist", "1.0", "0"))}
    keys |= set(all_keys(sd15.get_config("lora")))
    return keys


def config_names(text: str, sections: set[str]) -> list[str]:
    """Dotted names inside a config section (`train.lr`); Python paths such as `train.builder.build`
    (train.builder is no section) and file names are not config names."""
    return [name for name in FIELD.findall(text)
            if name.rsplit(".", 1)[0] in sections and name.rsplit(".", 1)[1] not in FILE_SUFFIXES]


def named_fields(keys: set[str]) -> dict[str, list[str]]:
    """{field: [files naming it]}."""
    sections = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    found: dict[str, list[str]] = {}
    for doc in DOCS:
        for name in config_names(doc.read_text(), sections):
            found.setdefault(name, []).append(doc.name)
    return found


def test_every_documented_config_field_exists():
    keys = schema_keys()
    found = named_fields(keys)
    assert len(found) > 40  # the scan does find the documented fields
    sample = "`train.lrr`, `--config.model.pol=gap`, `train.py`, `train.builder.build`, `results.json`"
    assert config_names(sample, {"train", "model"}) == ["train.lrr", "model.pol"]  # typos are caught
    missing = {name: docs for name, docs in found.items() if name not in keys}
    assert not missing, f"config fields named in the docs but absent from every schema: {missing}"
