"""The launchers' XLA:CPU scheduler (peft_jax/xla_cpu.py): off by default, the user's XLA_FLAGS win."""
from __future__ import annotations

import os

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


def test_launcher_setup_sets_it_before_jax_reads_the_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    monkeypatch.setattr(allocator, "reexec", lambda: None)
    runtime.setup()
    assert os.environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {xla_cpu.SCHEDULER_OFF}"
    runtime.setup()  # a re-executed launcher runs setup again: the flag is not repeated
    assert os.environ["XLA_FLAGS"].count(xla_cpu.SCHEDULER_FLAG) == 1
