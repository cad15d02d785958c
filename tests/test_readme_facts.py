"""The README's numbers that drift: the test count, the model table and the method-count tables.

Parameter counts come from abstract models (``nnx.eval_shape``: shapes only, nothing is compiled);
each failure names the README line to change and the value to write.
"""
import functools
import pathlib
import re
import subprocess
import sys

import pytest
from flax import nnx

from peft_jax.adapters import apply_peft, param_report, trainable_filter
from peft_jax.config import base_config
from peft_jax.models import create_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINES = (ROOT / "README.md").read_text().splitlines()
NAMES = re.compile(r"`([a-z0-9_]+)`")


def table(header_start: str) -> list[tuple[int, list[str]]]:
    """(line number, cells) of each row of the README table whose header row starts with ``header_start``."""
    start = next(i for i, line in enumerate(LINES) if line.startswith(header_start))
    rows = []
    for i in range(start + 2, len(LINES)):
        if not LINES[i].startswith("|"):
            break
        rows.append((i + 1, [c.strip() for c in LINES[i].strip("|").split("|")]))
    return rows


def number(text: str) -> int:
    return int(text.replace(",", ""))


def trainable(model_name: str, method: str) -> tuple[int, float]:
    cfg = base_config().peft
    cfg.method = method
    model = nnx.eval_shape(lambda: apply_peft(
        create_model(model_name, num_classes=2, image_size=224, rngs=nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1)))
    report = param_report(model, trainable_filter(cfg))
    return report["trainable_params"], report["trainable_percent"]


def percent_matches(shown: str, value: float) -> bool:
    """``shown`` is ``value`` at its printed precision (3 significant digits, or '100')."""
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return abs(float(shown) - value) <= 0.5 * 10 ** -decimals + 1e-9


@functools.cache
def collection() -> str:
    """``pytest --collect-only -q`` of the suite: one node id per line, then 'N tests collected'."""
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=ROOT, capture_output=True, text=True).stdout


def test_stated_test_count_matches_collection():
    hits = [(i + 1, m) for i, line in enumerate(LINES) for m in re.finditer(r"(?<!-n )\b(\d+) tests\b", line)]
    assert hits, "README.md states no test count ('N tests')"
    out = collection()
    found = re.search(r"^(\d+) tests? collected", out, re.M)
    assert found, f"pytest --collect-only found no tests:\n{out[-2000:]}"
    collected = int(found.group(1))
    wrong = [f"README.md line {n}: change '{m.group(0)}' to '{collected} tests'" for n, m in hits
             if int(m.group(1)) != collected]
    assert not wrong, "; ".join(wrong)


def test_slow_list_names_only_collected_tests(slow_test_ids):
    """A renamed or deleted test left in tests/slow_tests.txt would silently stop marking anything."""
    ids = set(collection().splitlines())
    listed = slow_test_ids
    stale = [node for node in listed if node not in ids]
    assert not stale, f"tests/slow_tests.txt names tests that no longer exist (remove those lines): {stale[:5]}"
    stated = re.search(r"\((\d+) of them in `tests/slow_tests.txt`", " ".join(LINES))
    assert stated and int(stated.group(1)) == len(listed), \
        f"README.md: write '({len(listed)} of them in `tests/slow_tests.txt`'"


def test_model_table_counts():
    wrong = []
    for line, cells in table("| name | params (1000 classes) |"):
        name = NAMES.search(cells[0]).group(1)
        model = nnx.eval_shape(lambda: create_model(name, num_classes=1000, image_size=224, rngs=nnx.Rngs(0)))
        actual = sum(x.size for x in __import__("jax").tree.leaves(nnx.state(model, nnx.Param)))
        if number(cells[1]) != actual:
            wrong.append(f"README.md line {line}: {name} has {actual:,} parameters, not {cells[1]}")
    assert not wrong, "; ".join(wrong)


def check_counts(line: int, names: list[str], counts: str, percents: str, model_name: str, wrong: list[str]) -> None:
    counts, percents = counts.split(" / "), percents.split(" / ")
    if len(counts) == 1 and len(names) > 1:  # one count for several methods that train the same
        counts, percents = counts * len(names), percents * len(names)
    for name, shown, shown_pct in zip(names, counts, percents, strict=True):
        actual, pct = trainable(model_name, name)
        if number(shown) != actual or not percent_matches(shown_pct, pct):
            wrong.append(f"README.md line {line}: {name} on {model_name} trains {actual:,} ({pct:.3g} %), "
                         f"not {shown} ({shown_pct} %)")


def test_vit_method_counts():
    wrong = []
    for line, cells in table("| ViT method |"):
        check_counts(line, NAMES.findall(cells[0]), cells[2], cells[3], "vit_b16", wrong)
    assert not wrong, "; ".join(wrong)


@pytest.mark.parametrize("model_name,column", [("resnet50", 2), ("efficientnet_lite0", 4)])
def test_cnn_method_counts(model_name, column):
    wrong = []
    for line, cells in table("| CNN method |"):
        check_counts(line, NAMES.findall(cells[0]), cells[column], cells[column + 1], model_name, wrong)
    assert not wrong, "; ".join(wrong)


def test_quickstart_table_counts():
    """The quickstart's trainable parameters and percentages (EfficientNet-Lite0, 2 classes)."""
    wrong = []
    for line, cells in table("| method | trainable params | trainable % |"):
        if cells[0].startswith("majority class"):
            continue
        method = "full" if cells[0] == "full, from scratch" else cells[0]
        check_counts(line, [method], cells[1], cells[2], "efficientnet_lite0", wrong)
    assert not wrong, "; ".join(wrong)
