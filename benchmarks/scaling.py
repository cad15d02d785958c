"""How the cost of a LoRA train step grows with the model and with the mesh, on this machine.

    python benchmarks/scaling.py                  # updates BENCHMARKS.md and docs/figures/scaling.png
    python benchmarks/scaling.py --measure vit_ti16,vit_s16 --no_write

Why: a user choosing between ViT-Ti and ViT-H, or sizing a mesh for ViT-H, needs to know what
one step costs before renting the hardware. Two tables, each row computed in its own worker
process (so that peak RSS is the row's own, and so that the simulated device count, which XLA
reads once at start-up, can differ per row):

1. by model size: ViT-Ti/16 ... ViT-H/14 with the default LoRA config (``base_config()``,
   ``peft.method=lora``), batch 8, 224 px, float32, 1 device. Parameter counts, XLA's memory
   analysis of the compiled step and, for the ``--measure`` models, the median step time;
   the others are dry runs (``classify.lower_train_step`` compiled, never run);
2. by mesh: ``configs/vit_h_lora.py`` (scanned blocks, rematerialisation) for ViT-B/16 and
   ViT-H/14 on 1, 2, 4, 8 simulated CPU devices (``mesh.fsdp=N``), dry runs
   (``classify.dry_run``): bytes per device of each state and of XLA's buffers.

The last line printed is one JSON object with every row.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # peft_jax uninstalled; benchmarks_md when a test imports this

from benchmarks_md import environment, gb, write_section  # noqa: E402  (beside this script)

HEADING = "## Cost by model size and mesh (`benchmarks/scaling.py`)"
SIZE_MODELS = ("vit_ti16", "vit_s16", "vit_b16", "vit_l16", "vit_h14")
MESH_MODELS = ("vit_b16", "vit_h14")
DEVICE_COUNTS = (1, 2, 4, 8)
BATCH, IMAGE = 8, 224
PLOT = ROOT / "docs" / "figures" / "scaling.png"


def peak_estimate(mem: dict) -> int:
    """Bytes the step holds at once if XLA frees nothing early: its arguments, the outputs that are not
    written into donated arguments, and its temporary buffer."""
    return (mem["argument_size_in_bytes"] + mem["output_size_in_bytes"] - mem["alias_size_in_bytes"]
            + mem["temp_size_in_bytes"])


MEMORY_KEYS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")


def size_config(model: str):
    """The project's default LoRA run (``base_config()``) on ``model`` at batch 8, 224 px, 1 device."""
    from peft_jax.config import base_config

    cfg = base_config()
    cfg.model.name, cfg.model.image_size = model, IMAGE
    cfg.peft.method = "lora"
    cfg.train.batch_size = BATCH
    return cfg


def mesh_config(model: str, devices: int):
    """``configs/vit_h_lora.py`` (the config meant for FSDP) on ``model``, FSDP over ``devices``."""
    import runpy

    cfg = runpy.run_path(str(ROOT / "configs" / "vit_h_lora.py"))["get_config"]()
    cfg.model.name, cfg.model.image_size = model, IMAGE
    cfg.train.batch_size = BATCH
    cfg.mesh.data, cfg.mesh.fsdp = 1, devices
    return cfg


def time_steps(compiled, cfg, mesh, warmup: int, steps: int) -> list[float]:
    """Seconds of each timed step of ``compiled`` on real state (the default init) and a random batch."""
    import jax
    import numpy as np

    from peft_jax.train import builder
    from peft_jax.train.state import setup

    built = builder.build(cfg, 2)  # 2 classes, as lower_train_step
    state = setup(cfg, built.model, built.trainable, mesh)
    rng = np.random.default_rng(0)
    batch = jax.device_put({"image": rng.normal(size=(BATCH, IMAGE, IMAGE, 3)).astype(np.float32),
                            "label": rng.integers(0, 2, BATCH).astype(np.int32)}, state.batch_sharding)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        metrics = state.advance(compiled, batch)
        jax.block_until_ready(metrics["loss"])
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def size_worker(model: str, measure: bool, warmup: int, steps: int) -> dict:
    """One row of the model-size table: the step lowered abstractly and compiled; run too if ``measure``."""
    from peft_jax.train import classify

    cfg = size_config(model)
    lowered, state, report = classify.lower_train_step(cfg)
    t = time.perf_counter()
    compiled = lowered.compile()
    row = {"model": model, "compile_s": time.perf_counter() - t, "measured": measure,
           **{k: report[k] for k in ("trainable_params", "total_params", "trainable_percent")},
           "memory_analysis": {k: int(getattr(compiled.memory_analysis(), k)) for k in MEMORY_KEYS}}
    if measure:
        median = statistics.median(time_steps(compiled, cfg, state.mesh, warmup, steps))
        row.update(median_s=median, images_per_s=BATCH / median,
                   peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return row


def mesh_worker(model: str, devices: int) -> dict:
    """One row of the mesh table: ``classify.dry_run`` of the FSDP config (its dry_run.json is not kept)."""
    from peft_jax.train import classify

    with tempfile.TemporaryDirectory() as work:
        return classify.dry_run(mesh_config(model, devices), work)


def run_worker(args: argparse.Namespace, kind: str, model: str, devices: int) -> dict:
    """A row computed in a fresh process: XLA reads the simulated device count once, before jax starts."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    command = [sys.executable, __file__, "--worker", kind, "--model", model, "--devices", str(devices),
               "--warmup", str(args.warmup), "--steps", str(args.steps)]
    if model in args.measure.split(","):
        command.append("--measured")
    print(f"[scaling] {kind} {model} on {devices} device(s)", file=sys.stderr, flush=True)
    out = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def size_row(r: dict) -> str:
    """A model-size table row; a dry run has no timing and no RSS of its own."""
    m = r["memory_analysis"]
    timing = (f"{r['median_s']:.2f} | {r['images_per_s']:.2f} | {gb(r['peak_rss_bytes'])}" if r["measured"]
              else "dry run | | ")
    return (f"| {r['model']} | {r['total_params']:,} | {r['trainable_params']:,} | {r['trainable_percent']:.2f}% | "
            f"{gb(m['argument_size_in_bytes'])} | {gb(m['output_size_in_bytes'])} | {gb(m['temp_size_in_bytes'])} | "
            f"{gb(peak_estimate(m))} | {r['compile_s']:.0f} | {timing} |")


def mesh_row(r: dict, one_device: dict) -> str:
    """A mesh table row; the last cell is its peak estimate over the same model's on 1 device."""
    m, peak = r["memory_analysis"], peak_estimate(r["memory_analysis"])
    return (f"| {r['model']} | {r['num_devices']} | {mb(r['frozen_bytes_per_device'])} | "
            f"{mb(r['trainable_bytes_per_device'])} | {mb(r['optimizer_bytes_per_device'])} | "
            f"{mb(m['argument_size_in_bytes'])} | {mb(m['temp_size_in_bytes'])} | {mb(peak)} | "
            f"{peak / peak_estimate(one_device['memory_analysis']):.3f} |")


def reading(result: dict) -> list[str]:
    """Sentences that only restate ratios of the tables' numbers."""
    size = result["size"]
    ratios = [r["memory_analysis"]["temp_size_in_bytes"] / r["memory_analysis"]["argument_size_in_bytes"]
              for r in size]
    lines = []
    if min(ratios) > 1:
        lines.append(f"At batch {BATCH} on 1 device XLA's temp buffer is {min(ratios):.1f}-{max(ratios):.1f}x the "
                     "argument bytes (all parameters, optimizer state and batch) for every model: the step's memory "
                     "is mostly temporaries (activations kept for the backward pass), not weights.")
    timed = [r for r in size if r["measured"]]
    if len(timed) > 1:
        a, b = timed[0], timed[-1]
        lines.append(f"From {a['model']} to {b['model']} the parameter count grows "
                     f"{b['total_params'] / a['total_params']:.1f}x and the median step time "
                     f"{b['median_s'] / a['median_s']:.1f}x.")
    if timed:
        rss = [r["peak_rss_bytes"] / peak_estimate(r["memory_analysis"]) for r in timed]
        lines.append(f"The measured rows' peak RSS is {min(rss):.1f}-{max(rss):.1f}x their peak estimate.")
    for model in MESH_MODELS:
        rows = {r["num_devices"]: r for r in result["mesh"] if r["model"] == model}
        one, last = rows[min(rows)], rows[max(rows)]
        unrolled = next((r for r in size if r["model"] == model), None)
        fall = {k: one[k] / last[k] for k in ("frozen_bytes_per_device", "optimizer_bytes_per_device")}
        temp = one["memory_analysis"]["temp_size_in_bytes"] / last["memory_analysis"]["temp_size_in_bytes"]
        text = (f"{model}: from {min(rows)} to {max(rows)} devices the frozen bytes per device fall "
                f"{fall['frozen_bytes_per_device']:.2f}x, the optimizer state "
                f"{fall['optimizer_bytes_per_device']:.2f}x and the temp buffer {temp:.2f}x.")
        if unrolled:
            text += (f" On 1 device the config's scanned, rematerialised blocks take the temp buffer from "
                     f"{gb(unrolled['memory_analysis']['temp_size_in_bytes'])} GB (unrolled, first table) to "
                     f"{gb(one['memory_analysis']['temp_size_in_bytes'])} GB.")
        lines.append(text)
    return lines


def markdown(result: dict, command: str) -> str:
    env, lora = result["environment"], result["lora"]
    shared = ", shared with other jobs while measured" if result["load_before"] >= 1 else ""
    lines = [
        HEADING, "",
        f"Command: `{command}` ({result['wall_s']:.0f} s)  ",
        f"Date: {env['date']}; CPU: {env['cpu']} ({env['cores']} cores{shared}; load average "
        f"{result['load_before']:.1f} before, {result['load_after']:.1f} after); Python {env['python']}, jax "
        f"{env['jax']}, flax {env['flax']}; allocator {env['allocator']}. Batch {BATCH}, {IMAGE} px, float32, "
        f"AdamW. On a shared machine step times move from run to run; the memory figures are XLA's and do not.",
        "",
        f"**By model size** (1 device): `base_config()` with `peft.method=lora` (rank {lora['rank']}, alpha "
        f"{lora['alpha']:g}, targets `{lora['targets']}`), blocks unrolled, no rematerialisation. Measured rows: "
        f"median of {result['steps']} steps after {result['warmup']} warm-up steps; peak RSS is the worker "
        "process's high-water mark over building, compiling and stepping. The other rows are dry runs (compiled, "
        "not run). Compile s: `lowered.compile()` alone.",
        "",
        "| model | params | trainable | trainable % | argument GB | output GB | temp GB | peak estimate GB | "
        "compile s | median step s | images/s | peak RSS GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(size_row(r) for r in result["size"]),
        "",
        "Argument, output and temp: `compiled.memory_analysis()` of the train step (argument: frozen and trainable "
        "parameters, optimizer state and the batch). Peak estimate = argument + output - alias + temp: every "
        "buffer held at once if nothing were freed early, outputs written into donated arguments counted once.",
        "",
        f"**By mesh** (dry runs, `classify.dry_run`): `configs/vit_h_lora.py` (scanned blocks, rematerialisation, "
        f"LoRA r{lora['rank']} on `{lora['targets']}`) with `model.name` set, `train.batch_size={BATCH}`, "
        "`mesh.data=1 mesh.fsdp=N` over N simulated CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`, "
        "one process per N). Bytes per device are the maximum over devices; frozen, trainable and optimizer from "
        "the state's shardings (`sharding.bytes_per_device`), argument and temp from XLA's memory analysis of the "
        "partitioned step.",
        "",
        "| model | devices | frozen MB/device | trainable MB/device | optimizer MB/device | argument MB/device | "
        "temp MB/device | peak estimate MB/device | peak estimate / 1 device's |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["mesh"]:
        one = next(o for o in result["mesh"] if o["model"] == r["model"] and o["num_devices"] == 1)
        lines.append(mesh_row(r, one))
    lines += ["", "Reading (ratios of the numbers above): " + " ".join(reading(result)), "",
              "![cost by model size and mesh](docs/figures/scaling.png)"]
    return "\n".join(lines) + "\n"


def model_ticks(ax, rows: list[dict]) -> None:
    """Log x axis of parameters (millions), one labelled tick per model instead of powers of ten."""
    ax.set_xscale("log")
    ax.set_xticks([r["total_params"] / 1e6 for r in rows],
                  [f"{r['model']}\n{r['total_params'] / 1e6:.0f} M" for r in rows], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("parameters")


def plot(result: dict, path: pathlib.Path) -> None:
    """Memory and step time against parameters (log-log), and bytes per device against the mesh."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory, speed, mesh) = plt.subplots(1, 3, figsize=(15, 4.5))
    size, timed = result["size"], [r for r in result["size"] if r["measured"]]
    params = [r["total_params"] / 1e6 for r in size]
    for label, value in (("argument", lambda m: m["argument_size_in_bytes"]),
                         ("temp", lambda m: m["temp_size_in_bytes"]), ("peak estimate", peak_estimate)):
        memory.plot(params, [value(r["memory_analysis"]) / 1e9 for r in size], marker="o", label=label)
    memory.set(yscale="log", ylabel="GB", title=f"XLA memory of one LoRA step (1 device, batch {BATCH})")
    model_ticks(memory, size)
    speed.plot([r["total_params"] / 1e6 for r in timed], [r["median_s"] for r in timed], marker="o")
    speed.set(yscale="log", ylabel="median step s", title="measured step time (" + result["environment"]["cpu"]
              + (", shared)" if result["load_before"] >= 1 else ")"))
    model_ticks(speed, timed)
    speed.set_yticks([r["median_s"] for r in timed], [f"{r['median_s']:.2f}" for r in timed])
    speed.minorticks_off()
    for model in MESH_MODELS:
        rows = [r for r in result["mesh"] if r["model"] == model]
        devices = [r["num_devices"] for r in rows]
        line, = mesh.plot(devices, [peak_estimate(r["memory_analysis"]) / 1e6 for r in rows], marker="o",
                          label=f"{model} peak estimate")
        mesh.plot(devices, [r["frozen_bytes_per_device"] / 1e6 for r in rows], marker="s", linestyle="--",
                  color=line.get_color(), label=f"{model} frozen params")
    mesh.set(xscale="log", yscale="log", xlabel="devices (mesh.fsdp)", ylabel="MB per device",
             title=f"FSDP dry runs (configs/vit_h_lora.py, batch {BATCH})")
    mesh.set_xticks(DEVICE_COUNTS, [str(n) for n in DEVICE_COUNTS])
    mesh.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    for ax in (memory, mesh):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", default="vit_ti16,vit_s16,vit_b16",
                        help="models whose step is run and timed; the others are dry runs")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--no_write", action="store_true", help="print the section; write neither file")
    parser.add_argument("--worker", choices=("size", "mesh"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--measured", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from peft_jax import runtime

    runtime.setup()  # the allocator launch/train.py uses; the workers inherit it
    if args.worker == "size":
        print(json.dumps(size_worker(args.model, args.measured, args.warmup, args.steps)))
        return
    if args.worker == "mesh":
        print(json.dumps(mesh_worker(args.model, args.devices)))
        return
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    size = [run_worker(args, "size", model, 1) for model in SIZE_MODELS]
    mesh = [run_worker(args, "mesh", model, n) for model in MESH_MODELS for n in DEVICE_COUNTS]
    lora = size_config(SIZE_MODELS[0]).peft
    result = {"size": size, "mesh": mesh, "warmup": args.warmup, "steps": args.steps,
              "lora": {k: lora[k] for k in ("rank", "alpha", "targets")}, "environment": environment("jax", "flax"),
              "load_before": load_before, "load_after": os.getloadavg()[0], "wall_s": time.perf_counter() - start}
    section = markdown(result, " ".join(["python benchmarks/scaling.py", *sys.argv[1:]]))
    print(section)
    if not args.no_write:
        write_section(pathlib.Path(args.out), HEADING, section)
        plot(result, PLOT)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
