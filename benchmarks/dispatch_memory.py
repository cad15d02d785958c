"""Peak memory and step time of train steps run back to back, by JAX's CPU dispatch and by allocator.

    python benchmarks/dispatch_memory.py               # the default cases, writes its BENCHMARKS.md section
    python benchmarks/dispatch_memory.py --cases vit_b16_lora_fp32 --allocators tcmalloc,mimalloc,default --no_write

Why (issue #19): compare_torch.py times steps one at a time, each long after the previous one freed its
scratch buffer. The train loop runs them back to back, reading a step's metrics after dispatching the next.
With JAX's asynchronous CPU dispatch a step's scratch buffer is freed only after its outputs are ready, so
the next step can allocate its own first, and under a malloc that keeps freed memory the process holds two
from then on. Each row is one worker process running compare_torch.py's JAX step for a case (the launchers'
scheduler), under one allocator (preloaded as the launchers preload it) and one dispatch
(``PEFT_JAX_CPU_ASYNC_DISPATCH``, peft_jax/xla_cpu.py). After warm-up the case's workers take turns: each
runs a round of steps back to back, as peft_jax/train/classify.py does, so machine noise hits every row
alike; a row's step time is its median round over the inline row's under the same allocator. The last line
printed is one JSON object with every row.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from benchmarks_md import environment, gb, write_section  # noqa: E402  (beside this script)
from compare_torch import CASES, CPU_CASES, peak_rss_since_reset, reset_peak_rss  # noqa: E402
from workers import WorkerProcess  # noqa: E402

from peft_jax import allocator, xla_cpu  # noqa: E402

HEADING = "## Back-to-back train steps by CPU dispatch (`benchmarks/dispatch_memory.py`)"
DEFAULT_CASES = "vit_b16_lora_fp32,vit_b16_full_fp32,efficientnet_lite0_full_fp32,resnet50_full_fp32"
DISPATCHES = {"inline": "0", "async": "1"}  # row name -> PEFT_JAX_CPU_ASYNC_DISPATCH; inline is the launchers'


def run_back_to_back(compiled, state: list, batch: dict, steps: int) -> float:
    """Seconds per step of ``steps`` steps the train loop's way: step i+1 is dispatched before step i's loss is
    read (with inline dispatch the call itself returns when the step is done)."""
    import jax

    start, pending = time.perf_counter(), None
    for _ in range(steps):
        state[0], state[2], state[3], metrics = compiled(*state, batch)
        if pending is not None:
            float(jax.device_get(pending["loss"]))
        pending = metrics
    float(jax.device_get(pending["loss"]))
    return (time.perf_counter() - start) / steps


def worker_main(case: str) -> None:
    """Line protocol on stdin/stdout: 'run N' -> seconds per step of N steps back to back; 'reset_peak' -> null;
    anything else -> final JSON (peak RSS since the reset, XLA's scratch bytes)."""
    xla_cpu.set_dispatch()
    from compare_torch import jax_step, random_batch, settings

    _, compiled, state = jax_step(*CASES[case])
    batch = random_batch(settings()["batch"])
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[:1] == ["run"]:
            print(json.dumps(run_back_to_back(compiled, state, batch, int(command[1]))), flush=True)
        elif command == ["reset_peak"]:
            reset_peak_rss()
            print(json.dumps(None), flush=True)
        else:
            break
    print(json.dumps({"step_peak_rss_bytes": peak_rss_since_reset(),
                      "xla_temp_bytes": compiled.memory_analysis().temp_size_in_bytes}), flush=True)


def start_worker(case: str, malloc: str, dispatch: str) -> WorkerProcess:
    """One row's process (case, allocator, dispatch), compiled and ready."""
    lib = allocator.FINDERS[malloc]() if malloc in allocator.FINDERS else None
    env = allocator.preload_env(malloc, lib, os.environ)
    env.update(PEFT_JAX_ALLOCATOR="default", JAX_PLATFORMS="cpu", **{xla_cpu.ASYNC_DISPATCH_ENV: DISPATCHES[dispatch]})
    print(f"[dispatch_memory] {case} {malloc} {dispatch}", file=sys.stderr, flush=True)
    return WorkerProcess({"case": case, "allocator": malloc, "dispatch": dispatch}, [__file__, "--worker", case],
                         xla_cpu.scheduler_env(env))


def measure(case: str, mallocs: list[str], warmup: int, rounds: int, round_steps: int) -> list[dict]:
    """Every (allocator, dispatch) row of one case, their rounds taken in turn."""
    workers = [start_worker(case, m, d) for m in mallocs for d in DISPATCHES]
    for w in workers:
        w.ask(f"run {warmup}")
        w.ask("reset_peak")
    times = {id(w): [] for w in workers}
    for _ in range(rounds):
        for w in workers:
            times[id(w)].append(w.ask(f"run {round_steps}"))
    rows = [{**w.finish(), "median_s": statistics.median(times[id(w)]), "times": times[id(w)]} for w in workers]
    inline = {r["allocator"]: r["median_s"] for r in rows if r["dispatch"] == "inline"}
    for r in rows:
        r["relative_step_time"] = r["median_s"] / inline[r["allocator"]]
    return rows


def markdown(result: dict, command: str) -> str:
    env = result["environment"]
    lines = [HEADING, "", f"Command: `{command}` ({result['wall_s']:.0f} s)  ",
             f"Date: {env['date']}; CPU: {env['cpu']} ({env['cores']} cores; load average {result['load_before']:.1f} "
             f"before, {result['load_after']:.1f} after); jax {env['jax']}; batch 8, 224 px, AdamW, the launchers' "
             "XLA:CPU scheduler.", "",
             f"One worker process per row. After {result['warmup']} warm-up steps each row runs {result['rounds']} "
             f"rounds of {result['round_steps']} steps back to back, the train loop's way (the next step dispatched "
             "before the previous step's loss is read), taking turns with the case's other rows. Peak RSS: the "
             "worker's VmHWM reset after warm-up. Step time / inline: the row's median round over the inline row's "
             "under the same allocator. Dispatch inline is the launchers' default "
             f"(`{xla_cpu.ASYNC_DISPATCH_ENV}=0`); async is JAX's own.", "",
             "| case | allocator | dispatch | JAX scratch GB | peak RSS GB, back to back | median s/step | "
             "step time / inline |",
             "|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['allocator']} | {r['dispatch']} | {gb(r['xla_temp_bytes'])} | "
              f"{gb(r['step_peak_rss_bytes'])} | {r['median_s']:.2f} | {r['relative_step_time']:.2f}x |"
              for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated: " + ", ".join(CPU_CASES))
    parser.add_argument("--allocators", default=None,
                        help="comma-separated: tcmalloc, mimalloc, default (glibc); default: the launchers' choice")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--round_steps", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--no_write", action="store_true", help="print the section; do not write it")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker)
        return
    mallocs = (args.allocators or allocator.choose(os.environ)[0]).split(",")
    for flag, names, valid in (("cases", args.cases.split(","), CPU_CASES), ("allocators", mallocs, allocator.NAMES)):
        bad = sorted(set(names) - set(valid))
        if bad:
            parser.error(f"unknown --{flag} {', '.join(bad)}; valid: {', '.join(valid)}")
    missing = [m for m in mallocs if m in allocator.FINDERS and allocator.FINDERS[m]() is None]
    if missing:
        parser.error(f"--allocators {', '.join(missing)}: not installed here (peft_jax/allocator.py says how)")
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    rows = [r for case in args.cases.split(",") for r in measure(case, mallocs, args.warmup, args.rounds,
                                                                 args.round_steps)]
    result = {"rows": rows, "warmup": args.warmup, "rounds": args.rounds, "round_steps": args.round_steps,
              "environment": environment("jax"), "load_before": load_before, "load_after": os.getloadavg()[0],
              "wall_s": time.perf_counter() - start}
    section = markdown(result, " ".join(["python benchmarks/dispatch_memory.py", *sys.argv[1:]]))
    print(section)
    if not args.no_write:
        write_section(pathlib.Path(args.out), HEADING, section)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
