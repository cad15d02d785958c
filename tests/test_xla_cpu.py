"""The launchers' XLA:CPU scheduler and dispatch (peft_jax/xla_cpu.py): the scheduler off and CPU steps inline by
default; the user's XLA_FLAGS and PEFT_JAX_CPU_ASYNC_DISPATCH win."""
from __future__ import annotations

import os

import jax
import pytest

from peft_jax import allocator, runtime, xla_cpu


def test_scheduler_is_turned_off_beside_other_flags():
    assert xla_cpu.scheduler_env({})["XLA_FLAGS"] == xla_cpu.SCHEDULER_OFF
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "HOME": "/h"}
    out = xla_cpu.scheduler_env(env)
    assert out == {"HOME": "/h", "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {xla_cpu.SCHEDULER_OFF}"}
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"  # the caller's dict is left alone


def test_an_explicit_scheduler_choice_is_kept():
    for value in ("true", "false"):
        env = {"XLA_FLAGS": f"--xla_cpu_enable_concurrency_optimized_scheduler={value}"}
        assert xla_cpu.scheduler_env(env) == env


@pytest.fixture
def restore_dispatch():
    before = jax.config._read("jax_cpu_enable_async_dispatch")
    yield
    jax.config.update("jax_cpu_enable_async_dispatch", before)


def test_launcher_setup_sets_it_before_jax_reads_the_flags(monkeypatch, restore_dispatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    monkeypatch.setattr(allocator, "reexec", lambda: None)
    runtime.setup()
    assert os.environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {xla_cpu.SCHEDULER_OFF}"
    runtime.setup()  # a re-executed launcher runs setup again: the flag is not repeated
    assert os.environ["XLA_FLAGS"].count(xla_cpu.SCHEDULER_FLAG) == 1
    assert jax.config._read("jax_cpu_enable_async_dispatch") is False  # CPU steps run inline


@pytest.mark.parametrize("value,expected", [(None, False), ("0", False), ("1", True), (" 1 ", True)])
def test_async_dispatch_is_read_from_the_environment(value, expected):
    env = {} if value is None else {xla_cpu.ASYNC_DISPATCH_ENV: value}
    assert xla_cpu.async_dispatch(env) is expected


def test_a_bad_dispatch_value_is_one_error_line(monkeypatch, capsys, restore_dispatch):
    monkeypatch.setenv(xla_cpu.ASYNC_DISPATCH_ENV, "yes")
    with pytest.raises(SystemExit) as exit_info:
        xla_cpu.set_dispatch()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: PEFT_JAX_CPU_ASYNC_DISPATCH=yes:") and "\n" not in err
    monkeypatch.setenv(xla_cpu.ASYNC_DISPATCH_ENV, "1")
    xla_cpu.set_dispatch()
    assert jax.config._read("jax_cpu_enable_async_dispatch") is True
