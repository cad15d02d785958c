"""The launchers' allocator choice (peft_jax/allocator.py): order, opt-outs and the re-exec."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from peft_jax import allocator


@pytest.fixture
def found(monkeypatch):
    """Sets which libraries the finders report: ``found(tcmalloc=..., mimalloc=...)``."""
    def set_found(tcmalloc=None, mimalloc=None):
        monkeypatch.setitem(allocator.FINDERS, "tcmalloc", lambda: tcmalloc)
        monkeypatch.setitem(allocator.FINDERS, "mimalloc", lambda: mimalloc)
    return set_found


def test_order_is_tcmalloc_then_mimalloc_then_glibc(found):
    found(tcmalloc="/lib/tc.so", mimalloc="/lib/mi.so")
    assert allocator.choose({}) == ("tcmalloc", "/lib/tc.so")
    found(mimalloc="/lib/mi.so")
    assert allocator.choose({}) == ("mimalloc", "/lib/mi.so")
    found()
    assert allocator.choose({}) == ("default", None)


def test_environment_picks_or_opts_out(found):
    found(tcmalloc="/lib/tc.so", mimalloc="/lib/mi.so")
    assert allocator.choose({"PEFT_JAX_ALLOCATOR": "mimalloc"}) == ("mimalloc", "/lib/mi.so")
    assert allocator.choose({"PEFT_JAX_ALLOCATOR": "Default"}) == ("default", None)
    assert allocator.choose({"PEFT_JAX_TCMALLOC": "0"}) == ("default", None)  # the older switch
    assert allocator.choose({"PEFT_JAX_TCMALLOC": "0", "PEFT_JAX_ALLOCATOR": "tcmalloc"}) == ("tcmalloc", "/lib/tc.so")
    with pytest.raises(ValueError, match="PEFT_JAX_ALLOCATOR=jemalloc: unknown allocator"):
        allocator.choose({"PEFT_JAX_ALLOCATOR": "jemalloc"})
    found(tcmalloc="/lib/tc.so")
    with pytest.raises(ValueError, match="mimalloc: the library is not installed; pip install cmeel-mimalloc"):
        allocator.choose({"PEFT_JAX_ALLOCATOR": "mimalloc"})


def test_preload_env_replaces_the_other_allocator_and_keeps_the_rest():
    env = allocator.preload_env("mimalloc", "/lib/mi.so", {"LD_PRELOAD": "/lib/libtcmalloc.so /lib/other.so", "A": "1"})
    assert env["LD_PRELOAD"] == "/lib/mi.so /lib/other.so" and env["A"] == "1"
    assert env["MIMALLOC_PURGE_DELAY"] == "-1"
    assert allocator.preload_env("default", None, {"LD_PRELOAD": "/lib/libtcmalloc.so"}) == {}


REEXEC = "from peft_jax import allocator\nallocator.reexec()\nprint(allocator.loaded())\n"


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="no /proc: not Linux")
@pytest.mark.parametrize("name", ["tcmalloc", "mimalloc"])
def test_launcher_reexecutes_under_the_chosen_allocator(name, tmp_path):
    lib = allocator.FINDERS[name]()
    if lib is None:
        pytest.skip(f"{name} is not installed (libtcmalloc-minimal4 / the cmeel-mimalloc wheel)")
    script = tmp_path / "launcher.py"
    script.write_text(REEXEC)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PEFT_JAX_TCMALLOC")}

    def launch(choice: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script)], env=dict(env, PEFT_JAX_ALLOCATOR=choice),
                              capture_output=True, text=True, timeout=60)

    out = launch(name)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [name] and f"using {name} ({lib})" in out.stderr  # read from /proc/self/maps
    out = launch("default")
    assert out.stdout.split() == ["default"] and not out.stderr
    out = launch("bogus")
    assert out.returncode == 2 and out.stderr.startswith("error: PEFT_JAX_ALLOCATOR=bogus")
