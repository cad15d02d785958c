"""Shared test fixtures: the real medical data in $PEFT_JAX_DATA, a tiny Stable Diffusion pipeline and a
quiet JAX, a local HTTP server. Helper functions with arguments (random torch references, random images, CSV subsets) live in
peft_jax/testing.py, so that tests import nothing but peft_jax."""
import functools
import http.server
import importlib.util
import os
import pathlib
import threading

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


# Tests measured over 3 s (setup + call) on 2 cores with -n 2, one "seconds node-id" per line: from
# `python -m pytest -q -n 2 --durations=0 tests` (each test's lines summed), then from the same run with
# -m "not slow" (a shared fixture's set-up moves to the first unmarked test). Remeasure after adding heavy tests.
SLOW_TESTS = pathlib.Path(__file__).with_name("slow_tests.txt")


def slow_test_ids() -> list[str]:
    """The node ids listed in tests/slow_tests.txt."""
    return [line.split(" ", 1)[1] for line in SLOW_TESTS.read_text().splitlines()]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: measured over 3 s on 2 cores (tests/slow_tests.txt) or marked by hand; "
                                       "`-m 'not slow'` is the quick development loop, CI runs everything")


def pytest_collection_modifyitems(config, items):
    """Marks the tests listed in tests/slow_tests.txt as slow."""
    slow = set(slow_test_ids())
    for item in items:
        if item.nodeid in slow:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(name="slow_test_ids")
def slow_test_ids_fixture() -> list[str]:
    """The slow list, for the test that checks it against the collection and the README."""
    return slow_test_ids()


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The folder of real public data (../shared/data in CI); skips the test when absent."""
    root = os.environ.get("PEFT_JAX_DATA")
    if not root or not pathlib.Path(root).is_dir():
        pytest.skip("needs the real data folder: set PEFT_JAX_DATA (CI sets it to ../shared/data)")
    return pathlib.Path(root)


@pytest.fixture
def ham_manual(shared_data, tmp_path) -> pathlib.Path:
    """HAM10000 in its release layout: the official metadata rows of the 140 shared images, images in part_1."""
    manual = tmp_path / "ham"
    manual.mkdir()
    os.symlink(shared_data / "ham10000" / "images", manual / "HAM10000_images_part_1")
    present = {p.stem for p in (shared_data / "ham10000" / "images").iterdir()}
    lines = (shared_data / "ham10000" / "HAM10000_metadata.csv").read_text().splitlines()
    (manual / "HAM10000_metadata.csv").write_text(
        "\n".join([lines[0]] + [line for line in lines[1:] if line.split(",")[1] in present]) + "\n")
    return manual


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> pathlib.Path:
    """A random-weight Stable Diffusion pipeline folder (peft_jax.testing.tiny_sd_pipeline), once per module."""
    from peft_jax.testing import tiny_sd_pipeline

    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd_tiny"))


@pytest.fixture(scope="session")
def sd15_config():
    """configs/sd15.py's ``get_config(method)``, loaded from its file as ``--config configs/sd15.py:METHOD`` does."""
    spec = importlib.util.spec_from_file_location("sd15_config", pathlib.Path(__file__).parents[1] / "configs" / "sd15.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(tmp_path):
    """(served folder, base URL) of an HTTP server on 127.0.0.1: the download tests never touch the network."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=root))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
