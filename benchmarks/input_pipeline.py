"""Input pipeline throughput against the train step's consumption, on this machine.

    PEFT_JAX_DATA=../shared/data python benchmarks/input_pipeline.py        # updates BENCHMARKS.md
    PEFT_JAX_DATA=../shared/data python benchmarks/input_pipeline.py --model vit_s16 --no_write

Why: on a CPU host the input pipeline and the train step share the same cores, so the
question is not only "is the pipeline faster than the step" but also "how much does feeding
the step slow it down". Three measurements, on TFDS-built datasets prepared from the real
release files of $PEFT_JAX_DATA (BUSI: grey 256 px PNG; HAM10000: colour 200x150 JPEG):

1. pipeline alone: images/s of `train_batches` (decode + random resized crop to 224 px +
   flip + normalise, batch 8) with 0 / 1 / 2 grain threads in-process and 1 / 2 grain worker
   processes, timed after warm-up, configurations interleaved over rounds, medians;
2. train step alone: images/s of the jitted ViT LoRA train step (batch 8, 224 px, fixed batch);
3. fed: the same step consuming the pipeline (2 threads): its images/s and slowdown.

The last line printed is one JSON object with every median.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks_md import environment, write_section  # noqa: E402  (beside this script)
from peft_jax import runtime  # noqa: E402

runtime.setup()  # the allocator launch/train.py uses

BATCH, SIZE = 8, 224
HEADING = "## Input pipeline vs train step (`benchmarks/input_pipeline.py`)"
# name -> (num_threads, num_workers)
PIPELINES = {"0 threads": (0, 0), "1 thread": (1, 0), "2 threads": (2, 0), "1 worker": (1, 1), "2 workers": (1, 2)}


def prepare(name: str, data_root: pathlib.Path, work: pathlib.Path):
    """The train split of a dataset built from its release files (a release-like layout of the shared subset)."""
    import ml_collections

    from peft_jax import data

    if name == "ham10000":  # the shared metadata lists all 10,015 images; keep the rows of the 140 present
        manual = work / "ham10000"
        manual.mkdir(parents=True, exist_ok=True)
        present = {p.stem for p in (data_root / "ham10000" / "images").iterdir()}
        lines = (data_root / "ham10000" / "HAM10000_metadata.csv").read_text().splitlines()
        (manual / "HAM10000_metadata.csv").write_text(
            "\n".join([lines[0]] + [line for line in lines[1:] if line.split(",")[1] in present]) + "\n")
        if not (manual / "images").exists():
            os.symlink(data_root / "ham10000" / "images", manual / "images")
    else:
        manual = data_root / name
    cfg = ml_collections.ConfigDict(dict(name=name, manual_dir=str(manual), data_dir=str(work / "tfds"),
                                         fraction=1.0, config=None, skip_bad_files=False))
    return data.load_dataset(cfg, seed=0).train


def time_pipeline(split, threads: int, workers: int, batches: int) -> tuple[float, float]:
    """(images/s after warm-up, seconds to the first batch)."""
    from peft_jax import data

    t0 = time.perf_counter()
    it = data.train_batches(split, batch_size=BATCH, image_size=SIZE, seed=0, num_threads=threads,
                            num_workers=workers)
    next(it)
    first = time.perf_counter() - t0
    for _ in range(2):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * BATCH / (time.perf_counter() - t)
    del it  # stops worker processes before the next configuration starts
    return rate, first


def make_step(model: str):
    """A jitted LoRA train step at batch 8, 224 px, and its initial state."""
    import jax

    from peft_jax import sharding as shd
    from peft_jax.config import base_config
    from peft_jax.train import builder, step as step_lib
    from peft_jax.train.state import setup

    cfg = base_config()
    cfg.model.name, cfg.model.image_size = model, SIZE
    cfg.peft.method = "lora"
    built = builder.build(cfg, 3)
    train_state = setup(cfg, built.model, built.trainable, shd.make_mesh(cfg.mesh))
    steps = step_lib.compile_steps(train_state, cfg.train)
    state = [train_state.trainable, train_state.frozen, train_state.rest, train_state.opt_state]

    def run(batch: dict) -> None:
        state[0], state[2], state[3], metrics = steps.train(state[0], state[1], state[2], state[3], batch)
        jax.block_until_ready(metrics["loss"])

    return run


def time_steps(run, batches, steps: int) -> list[float]:
    """Seconds per step, each including the wait for its batch."""
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(batches)
        run({"image": batch["image"], "label": batch["label"]})
        times.append(time.perf_counter() - t)
    return times


def markdown(result: dict, command: str) -> str:
    env = result["environment"]
    lines = [
        HEADING, "",
        f"Command: `{command}`  ",
        f"Date: {env['date']}; CPU: {env['cpu']} ({env['cores']} cores, **shared with other engineers' jobs while "
        f"measured**: load average {result['load_before']:.1f} before, {result['load_after']:.1f} after); Python "
        f"{env['python']}, jax {env['jax']}, grain {env['grain']}, Pillow {env['pillow']}; allocator "
        f"{env['allocator']}. Batch {BATCH}, {SIZE} px, random resized crop + flip + normalise; medians over "
        f"{result['rounds']} interleaved rounds of {result['batches']} batches after 2 warm-up batches. On a shared "
        f"machine the absolute numbers move from run to run; the ratios are the result.",
        "",
        "Pipeline alone (images/s; first batch in seconds). Worker processes start prefetching before the "
        "timing starts, so with few batches timed their images/s can include batches made during start-up:",
        "",
        "| dataset (release format) | " + " | ".join(PIPELINES) + " |",
        "|---|" + "---:|" * len(PIPELINES),
    ]
    for name, rows in result["pipeline"].items():
        cells = [f"{rows[p]['images_per_s']:.0f} ({rows[p]['first_batch_s']:.1f} s)" for p in PIPELINES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    step = result["step"]
    lines += [
        "",
        f"Train step alone ({result['model']} LoRA r=8 on q,v; AdamW; fixed batch): "
        f"**{step['images_per_s']:.2f} images/s** (median step {step['median_s']:.2f} s over "
        f"{result['rounds']} x {result['steps']} steps, interleaved with the fed steps below).",
        "",
        "| dataset | pipeline (2 threads) / step consumption | step fed by the pipeline, images/s | fed / fixed-batch "
        "step time |",
        "|---|---:|---:|---:|",
    ]
    for name, fed in result["fed"].items():
        ratio = result["pipeline"][name]["2 threads"]["images_per_s"] / step["images_per_s"]
        lines.append(f"| {name} | {ratio:.0f}x | {fed['images_per_s']:.2f} | "
                     f"{fed['median_s'] / step['median_s']:.2f} |")
    slowest = min(rows["2 threads"]["images_per_s"] for rows in result["pipeline"].values())
    lines += ["", f"Reading: with 2 threads the slowest dataset's pipeline produces "
              f"{slowest / step['images_per_s']:.0f}x what the {result['model']} step consumes on this CPU; the last "
              f"column is what feeding costs the step when both share the cores (1.00: nothing). An accelerator step "
              f"is orders of magnitude faster: there, the pipeline's images/s per core above is the budget to size "
              f"`dataset.num_workers` with."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="busi,ham10000")
    parser.add_argument("--model", default="vit_b16", help="vit_b16, or vit_s16 where B is too slow")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3, help="train steps per source and round")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--no_write", action="store_true")
    args = parser.parse_args()
    if not os.environ.get("PEFT_JAX_DATA"):
        sys.exit("error: set PEFT_JAX_DATA to the folder of real data (../shared/data): the benchmark reads the "
                 "BUSI and HAM10000 release files there.")
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
    load_before = os.getloadavg()[0]
    work = pathlib.Path(tempfile.mkdtemp(prefix="input_pipeline_"))
    splits = {name: prepare(name, pathlib.Path(os.environ["PEFT_JAX_DATA"]), work)
              for name in args.datasets.split(",")}

    samples = {name: {p: [] for p in PIPELINES} for name in splits}
    for _ in range(args.rounds):
        for name, split in splits.items():
            for p, (threads, workers) in PIPELINES.items():
                samples[name][p].append(time_pipeline(split, threads, workers, args.batches))
    pipeline = {name: {p: {"images_per_s": statistics.median(r for r, _ in s),
                           "first_batch_s": statistics.median(f for _, f in s)} for p, s in rows.items()}
                for name, rows in samples.items()}

    from peft_jax import data

    run = make_step(args.model)
    fixed = next(data.train_batches(next(iter(splits.values())), batch_size=BATCH, image_size=SIZE, seed=0))
    sources = {"fixed": iter(lambda: fixed, None)}
    sources.update({name: data.train_batches(split, batch_size=BATCH, image_size=SIZE, seed=1, num_threads=2)
                    for name, split in splits.items()})
    time_steps(run, sources["fixed"], 3)  # compile and warm up
    step_times = {name: [] for name in sources}
    for _ in range(args.rounds):  # interleaved, so that load from other jobs hits every source alike
        for name, batches in sources.items():
            step_times[name] += time_steps(run, batches, args.steps)
    alone = statistics.median(step_times.pop("fixed"))
    fed = {name: {"median_s": statistics.median(t), "images_per_s": BATCH / statistics.median(t)}
           for name, t in step_times.items()}
    result = {"model": args.model, "rounds": args.rounds, "batches": args.batches, "steps": args.steps,
              "environment": environment("jax", "grain", "pillow"), "pipeline": pipeline,
              "step": {"median_s": alone, "images_per_s": BATCH / alone}, "fed": fed,
              "load_before": load_before, "load_after": os.getloadavg()[0]}
    command = "PEFT_JAX_DATA=../shared/data python benchmarks/input_pipeline.py " + " ".join(sys.argv[1:])
    section = markdown(result, command.strip())
    print(section)
    if not args.no_write:
        write_section(pathlib.Path(args.out), HEADING, section)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
