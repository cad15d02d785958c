"""Peak memory and step time of a ViT-B/16 PEFT train step by rematerialisation policy and XLA:CPU scheduler.

    python benchmarks/vit_memory.py                    # fp32 rows, writes its BENCHMARKS.md section
    python benchmarks/vit_memory.py --dtypes bf16 --layers scanned --remat none,projections_saveable --no_write
    python benchmarks/vit_memory.py --method vpt_deep    # another compare_torch ViT method, its own section

Why (issue #19): JAX's LoRA step peaks above torch+peft's on CPU, most of it XLA's temp buffer. A PEFT step
with a frozen backbone needs few activations for its backward pass, so recomputing the rest (``model.remat``
with a ``model.remat_policy``) may buy the memory back cheaply; XLA:CPU's concurrency-optimised scheduler
(``--xla_cpu_enable_concurrency_optimized_scheduler``) keeps more buffers alive, and unrolled blocks let it
schedule recomputation early, which a scan (``model.scan_layers``) does not. Each row is one worker
process (its own XLA_FLAGS, read once at start, and its own peak RSS) running compare_torch.py's
vit_b16_<method> configuration (LoRA by default). Its steps, warm-up included, alternate with those of a
reference worker (unrolled, no remat, default scheduler, same dtype) that lives for the whole run: a row's
step time is compared with
steps taken in the same minutes on these shared cores, and, as in compare_torch's interleaving, each step
starts long after the previous one freed its temp buffer. Then the row runs a few steps back to back, as the
train loop does: under JAX's asynchronous dispatch a step could allocate its temp buffer before the previous
step's was freed, and with a malloc that keeps freed memory (tcmalloc, mimalloc) the process then held two
(the launchers now dispatch inline: benchmarks/dispatch_memory.py). The last
line printed is one JSON object with every row.
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
from compare_torch import serve_steps  # noqa: E402
from workers import WorkerProcess  # noqa: E402

from peft_jax import xla_cpu  # noqa: E402

METHODS = ("lora", "full", "linear", "ssf", "vpt_deep")  # compare_torch.py's ViT-B/16 methods
TORCH_HEADING = "## Train step vs PyTorch: vit_b16"
BATCH, SIZE = 8, 224
# --remat names: no remat, the whole block (model.remat_policy unset, i.e. nothing_saveable), or a policy.
REMATS = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "projections_saveable")
SCHEDULERS = {"default": "", "concurrency_off": xla_cpu.SCHEDULER_OFF}  # default: XLA's own (the launchers turn it off)
LAYERS = ("unrolled", "scanned")  # model.scan_layers False / True
REFERENCE = ("unrolled", "none", "default")  # layers, remat, scheduler of every row's time reference
TIME_LIMIT = 1.05  # the issue's bound on the step time, relative to the reference
BACK_TO_BACK = 10  # steps each row runs back to back after its timed ones (the overlap is a race)


def heading(method: str) -> str:
    """The method's BENCHMARKS.md section (LoRA's keeps the heading it was first written under)."""
    name = "LoRA" if method == "lora" else method
    return f"## ViT-B/16 {name} step memory by remat policy and scheduler (`benchmarks/vit_memory.py`)"


def step_config(dtype: str, layers: str, remat: str, method: str):
    """compare_torch.py's vit_b16_<method>_<dtype> JAX configuration, whose torch figures this is read against."""
    from peft_jax.config import base_config

    cfg = base_config()
    cfg.model.name, cfg.model.image_size = "vit_b16", SIZE
    cfg.model.scan_layers = layers == "scanned"
    cfg.model.remat = remat != "none"
    cfg.model.remat_policy = None if remat in ("none", "full") else remat
    cfg.peft.method = method
    cfg.train.update(num_steps=1000, warmup_steps=10, grad_clip=0.0, weight_decay=0.01, batch_size=BATCH)
    if dtype == "bf16":  # as compare_torch's CPU bf16 rows: bf16 products, float32 activations
        cfg.train.matmul_dtype = "bfloat16"
    return cfg


def build_step(dtype: str, layers: str, remat: str, method: str):
    """(one_step, memory): a callable that runs one train step and returns its seconds, and XLA's memory
    analysis of the compiled step."""
    import jax
    import numpy as np

    from peft_jax import sharding as shd
    from peft_jax.train import builder, step as step_lib
    from peft_jax.train.state import setup

    cfg = step_config(dtype, layers, remat, method)
    built = builder.build(cfg, 2)
    state = setup(cfg, built.model, built.trainable, shd.make_mesh(cfg.mesh, jax.devices()[:1]))
    rng = np.random.default_rng(0)
    batch = jax.device_put({"image": rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32),
                            "label": rng.integers(0, 2, BATCH).astype(np.int32)}, state.batch_sharding)
    compiled = step_lib.compile_steps(state, cfg.train).train.lower(
        state.trainable, state.frozen, state.rest, state.opt_state, batch).compile()
    analysis = compiled.memory_analysis()
    memory = {k: int(getattr(analysis, k)) for k in ("temp_size_in_bytes", "argument_size_in_bytes")}

    def one_step() -> float:
        t = time.perf_counter()
        jax.block_until_ready(state.advance(compiled, batch)["loss"])
        return time.perf_counter() - t

    return one_step, memory


def worker_main(dtype: str, layers: str, remat: str, method: str) -> None:
    """Line protocol on stdin/stdout: 'step' -> seconds; 'reset_peak' -> null; 'peak' -> peak RSS bytes since the
    reset; anything else -> final JSON."""
    one_step, memory = build_step(dtype, layers, remat, method)
    print("ready", flush=True)
    serve_steps(one_step)
    print(json.dumps(memory), flush=True)


def start_worker(method: str, dtype: str, layers: str, remat: str, scheduler: str) -> WorkerProcess:
    """One row's process, compiled and ready."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} {SCHEDULERS[scheduler]}".strip()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    print(f"[vit_memory] {method} {dtype} {layers} remat={remat} scheduler={scheduler}", file=sys.stderr, flush=True)
    return WorkerProcess({"dtype": dtype, "layers": layers, "remat": remat, "scheduler": scheduler},
                         [__file__, "--worker", "--method", method, "--dtypes", dtype, "--layers", layers, "--remat",
                          remat], env)


def measure(method: str, row: tuple[str, str, str, str], reference: WorkerProcess, warmup: int, steps: int) -> dict:
    """A row (dtype, layers, remat, scheduler) of ``method``: its worker's steps alternated with the reference's,
    its median over the reference's in the same window and its peak RSS there; then its peak after steps back
    to back."""
    worker = start_worker(method, *row)
    times, reference_times = [], []
    for i in range(warmup + steps):
        if i == warmup:
            worker.ask("reset_peak")
        seconds, reference_seconds = worker.ask("step"), reference.ask("step")
        if i >= warmup:
            times.append(seconds)
            reference_times.append(reference_seconds)
    step_peak = worker.ask("peak")
    for _ in range(BACK_TO_BACK):
        worker.ask("step")
    back_to_back_peak = worker.ask("peak")
    median, reference_median = statistics.median(times), statistics.median(reference_times)
    return {**worker.finish(), "step_peak_rss_bytes": step_peak, "back_to_back_peak_rss_bytes": back_to_back_peak,
            "median_s": median, "times": times, "reference_median_s": reference_median,
            "relative_step_time": median / reference_median}


def torch_peaks(benchmarks_md: pathlib.Path, method: str) -> dict:
    """torch+peft's peak RSS in the timed steps (GB, as printed) per dtype and the date, quoted from the committed
    compare_torch vit_b16 section."""
    text = benchmarks_md.read_text() if benchmarks_md.exists() else ""
    if TORCH_HEADING not in text:
        return {}
    section = text.split(TORCH_HEADING, 1)[1].split("\n## ", 1)[0]
    date = section.split("Date: ", 1)[1].split(";", 1)[0] if "Date: " in section else "undated"
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith(f"| vit_b16_{method}_")]
    header = next(line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| case"))
    column = next(i for i, name in enumerate(header) if "in the timed steps" in name)
    peaks = {cells[0].strip().removeprefix(f"vit_b16_{method}_"): cells[column].split("/")[1].strip() for cells in rows}
    return {"date": date, **peaks}


def table_row(r: dict) -> str:
    policy = {"none": "", "full": "unset (whole block)"}.get(r["remat"], r["remat"])
    return (f"| {r['dtype']} | {r['layers'] == 'scanned'} | {r['remat'] != 'none'} | {policy} | {r['scheduler']} | "
            f"{gb(r['temp_size_in_bytes'])} | {gb(r['argument_size_in_bytes'])} | {gb(r['step_peak_rss_bytes'])} | "
            f"{gb(r['back_to_back_peak_rss_bytes'])} | {r['median_s']:.2f} | {r['relative_step_time']:.2f}x |")


def describe(rows: list[dict], key: str) -> str:
    return "; ".join(f"{r['layers']}, remat {r['remat']}, scheduler {r['scheduler']} ({gb(r[key])} GB, "
                     f"{r['relative_step_time']:.2f}x)" for r in rows) or "none"


def reading(result: dict) -> list[str]:
    """Sentences that restate the table against torch's quoted peak and the 1.05x bound."""
    lines = []
    for dtype in dict.fromkeys(r["dtype"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["dtype"] == dtype]
        same = next((r for r in rows if (r["layers"], r["remat"], r["scheduler"]) == REFERENCE), None)
        if same:
            lines.append(f"{dtype}: the unrolled no-remat default-scheduler row, the reference's own program in "
                         f"another process, reads {same['relative_step_time']:.2f}x (this run's noise).")
        limit = result["torch"].get(dtype)
        if not limit:
            continue
        fast = [r for r in rows if r["relative_step_time"] <= TIME_LIMIT]
        for key, where in (("step_peak_rss_bytes", "in the alternated steps"),
                           ("back_to_back_peak_rss_bytes", "after the back-to-back steps too")):
            fits = [r for r in fast if float(gb(r[key])) <= float(limit)]
            lines.append(f"{dtype}: rows at or below torch's {limit} GB {where}, at no more than {TIME_LIMIT:.2f}x "
                         f"the step time: {describe(fits, key)}.")
        doubled = [r for r in rows if r["back_to_back_peak_rss_bytes"] - r["step_peak_rss_bytes"]
                   > r["temp_size_in_bytes"] / 2]
        lines.append(f"{dtype}: back to back, {len(doubled)} of {len(rows)} rows came to hold a second temp buffer "
                     "(peak up by more than half the temp size); that overlap is a race, so a row without it here "
                     "may still show it in a longer run.")
    if result["load_before"] >= 1 or result["load_after"] >= 1:
        lines.append(f"The cores were shared with another job (load average {result['load_before']:.1f} before, "
                     f"{result['load_after']:.1f} after): the step-time ratios carry that noise; the temp and "
                     "argument bytes are XLA's and do not depend on it.")
    return lines


def markdown(result: dict, command: str) -> str:
    env, torch = result["environment"], result["torch"]
    quoted = (f"torch+peft's peak RSS in the timed steps, quoted from the section \"Train step vs PyTorch: vit_b16\" "
              f"of this file (dated {torch['date']}, not re-measured here): "
              + ", ".join(f"{k} {v} GB" for k, v in torch.items() if k != "date") + "."
              if torch else "No torch figure: this file has no \"Train step vs PyTorch: vit_b16\" section.")
    lines = [
        heading(result["method"]), "",
        f"Command: `{command}` ({result['wall_s']:.0f} s)  ",
        f"Date: {env['date']}; CPU: {env['cpu']} ({env['cores']} cores; load average {result['load_before']:.1f} "
        f"before, {result['load_after']:.1f} after); jax {env['jax']}; allocator {env['allocator']}. "
        f"compare_torch.py's vit_b16_{result['method']} configuration"
        + (": LoRA r8 on q and v" if result["method"] == "lora" else "") + f", batch {BATCH}, {SIZE} px, AdamW; bf16 "
        "rows with `train.matmul_dtype=bfloat16` as compare_torch's CPU bf16 rows.",
        "",
        "One worker process per row, with `model.scan_layers`, `model.remat` and `model.remat_policy` as shown and, "
        f"for concurrency_off, `XLA_FLAGS={SCHEDULERS['concurrency_off']}`. Its {result['warmup']} warm-up and "
        f"{result['steps']} timed steps alternate with those of a reference worker (unrolled, no remat, default "
        "scheduler, same dtype) that lives for the whole run; step time / reference = the row's median over the "
        "reference's median in the same steps. Temp and argument: `compiled.memory_analysis()` (XLA's scratch "
        "buffer; parameters, optimizer state and batch). Peak RSS in the timed steps: the worker's VmHWM reset "
        "after warm-up, as compare_torch measures it (there too each step waits for the other framework's). "
        f"Back to back: the same high-water mark after {BACK_TO_BACK} more steps run one after the other, as the "
        "train loop runs them, where a step can allocate its temp buffer before the previous step's is freed.",
        "",
        "| dtype | model.scan_layers | model.remat | model.remat_policy | scheduler | temp GB | argument GB | peak "
        "RSS GB in the timed steps | peak RSS GB, back to back | median step s | step time / reference |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
        *(table_row(r) for r in result["rows"]),
        "",
        quoted,
        "",
        "Reading: " + " ".join(reading(result)),
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict:
    """Every row of every dtype; one reference worker per dtype."""
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    rows = []
    for dtype in args.dtypes.split(","):
        reference = start_worker(args.method, dtype, *REFERENCE)
        for _ in range(args.warmup):
            reference.ask("step")
        rows += [measure(args.method, (dtype, layers, remat, scheduler), reference, args.warmup, args.steps)
                 for layers in args.layers.split(",") for scheduler in args.schedulers.split(",")
                 for remat in args.remat.split(",")]
        reference.finish()
    return {"method": args.method, "rows": rows, "warmup": args.warmup, "steps": args.steps,
            "environment": environment("jax"), "torch": torch_peaks(pathlib.Path(args.out), args.method), "load_before": load_before,
            "load_after": os.getloadavg()[0], "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="lora", choices=METHODS)
    parser.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16")
    parser.add_argument("--layers", default=",".join(LAYERS), help="comma-separated: " + ", ".join(LAYERS))
    parser.add_argument("--remat", default=",".join(REMATS), help="comma-separated: " + ", ".join(REMATS))
    parser.add_argument("--schedulers", default=",".join(SCHEDULERS), help="comma-separated: " + ", ".join(SCHEDULERS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--no_write", action="store_true", help="print the section; do not write it")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for flag, valid in (("dtypes", ("fp32", "bf16")), ("layers", LAYERS), ("remat", REMATS),
                        ("schedulers", tuple(SCHEDULERS))):
        bad = sorted(set(getattr(args, flag).split(",")) - set(valid))
        if bad:
            parser.error(f"unknown --{flag} {', '.join(bad)}; valid: {', '.join(valid)}")
    from peft_jax import runtime

    runtime.setup()  # the allocator launch/train.py uses; the workers inherit it
    if args.worker:
        worker_main(args.dtypes, args.layers, args.remat, args.method)
        return
    result = run(args)
    section = markdown(result, " ".join(["python benchmarks/vit_memory.py", *sys.argv[1:]]))
    print(section)
    if not args.no_write:
        write_section(pathlib.Path(args.out), heading(args.method), section)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
