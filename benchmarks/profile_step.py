"""Where a train step's time goes, in JAX and in PyTorch: the two profilers, side by side.

    python benchmarks/profile_step.py                       # vit_b16_full_fp32, vit_b16_lora_bf16, resnet50_full_fp32
    python benchmarks/profile_step.py --cases resnet50_full_fp32 --steps 3

The steps are compare_torch.py's (same models, batch, optimizer, threads), each framework in
its own process. JAX: ``jax.profiler`` records every XLA:CPU thunk; each is classed by the HLO
instruction it runs (a library fusion by what it fuses). torch: ``torch.profiler`` self time per
aten operator. Both are the wall time of each operation (which uses every core inside), summed
per category and per step; the step's wall time is reported beside. Writes its section of
BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks_md import write_section  # noqa: E402  (beside this script)
import compare_torch  # noqa: E402  (beside this script)

HEADING = "## Train-step profiles, JAX vs torch (`benchmarks/profile_step.py`)"
DEFAULT_CASES = "vit_b16_full_fp32,vit_b16_lora_bf16,resnet50_full_fp32"
CATEGORIES = ("matrix products", "convolutions", "transposes and layout copies",
              "normalisation, activations, optimizer and the rest")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = \S+ ([\w-]+)\((.*)")


def hlo_categories(hlo_text: str) -> dict[str, str]:
    """Instruction name -> category, for every instruction in ``hlo_text``.

    A fusion (or other call) takes the category of the heaviest operation in the computation it
    calls: products and convolutions first, then transposes and copies."""
    instructions: dict[str, tuple[str, str | None]] = {}  # name -> (opcode, called computation)
    ops_in: dict[str, set[str]] = collections.defaultdict(set)  # computation -> its opcodes
    computation = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        match = _INSTRUCTION.match(line)
        if head:
            computation = head.group(1)
        elif match and computation:
            name, op, rest = match.groups()
            called = re.search(r"calls=%([\w.-]+)", rest)
            instructions[name] = (op, called.group(1) if called else None)
            ops_in[computation].add(op)

    def category(ops: set[str]) -> str:
        if "dot" in ops:
            return CATEGORIES[0]
        if "convolution" in ops:
            return CATEGORIES[1]
        if ops & {"transpose", "copy"}:
            return CATEGORIES[2]
        return CATEGORIES[3]

    return {name: category(ops_in[called] if called else {op}) for name, (op, called) in instructions.items()}


def jax_profile(case: str, steps: int) -> dict:
    import jax

    one_step, compiled, _ = compare_torch.jax_step(*compare_torch.CASES[case])
    hlo = compiled.as_text()
    categories = hlo_categories(hlo)
    shapes = dict(re.findall(r"^\s*(?:ROOT )?%(\S+) = (\S+) ", hlo, flags=re.M))
    for _ in range(2):
        one_step()
    with tempfile.TemporaryDirectory() as tmp:
        wall = []
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                wall.append(one_step())
        trace_file = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)[0]
        events = json.load(gzip.open(trace_file))
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals, by_instruction = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event["name"] in categories:  # thunks; not the executor's own events
            totals[categories[event["name"]]] += event.get("dur", 0) / 1e6
            by_instruction[event["name"]] += event.get("dur", 0) / 1e6
    products = [n for n in by_instruction if categories[n] == CATEGORIES[0]]
    library = sum(by_instruction[n] for n in products if "nn_fusion" in n) / steps
    generic = sum(by_instruction[n] for n in products if "nn_fusion" not in n) / steps
    heaviest = [(name, categories[name], seconds / steps, shapes.get(name, ""))
                for name, seconds in by_instruction.most_common(8)]
    return {"wall_s": sorted(wall)[len(wall) // 2], "seconds": {k: v / steps for k, v in totals.items()},
            "heaviest": heaviest,
            "note": f"products {library:.2f} s in library (YNNPACK/XNNPACK) fusions, {generic:.2f} s in XLA's "
                    "generic kernel"}


_TORCH_PRODUCTS = {"addmm", "mm", "bmm", "baddbmm", "matmul", "linear"}
_TORCH_CONVOLUTIONS = {"convolution", "_convolution", "mkldnn_convolution", "convolution_backward"}
_TORCH_COPIES = {"copy_", "clone", "contiguous", "_to_copy"}


def torch_category(op: str) -> str:
    base = op.removeprefix("aten::")
    if base in _TORCH_PRODUCTS or base.startswith(("_scaled_dot_product", "_flash_attention")):
        return CATEGORIES[0]
    if base in _TORCH_CONVOLUTIONS:
        return CATEGORIES[1]
    if base in _TORCH_COPIES:
        return CATEGORIES[2]
    return CATEGORIES[3]


def torch_profile(case: str, steps: int) -> dict:
    import torch

    one_step, _ = compare_torch.torch_worker(*compare_torch.CASES[case])
    for _ in range(2):
        one_step()
    wall = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            wall.append(one_step())
    totals = collections.Counter()
    for avg in prof.key_averages():
        totals[torch_category(avg.key)] += avg.self_cpu_time_total / 1e6
    return {"wall_s": sorted(wall)[len(wall) // 2], "seconds": {k: v / steps for k, v in totals.items()},
            "note": "self time per aten operator"}


def run_worker(framework: str, case: str, steps: int, threads: int) -> dict:
    from peft_jax import allocator

    malloc = allocator.choose(os.environ) if framework == "jax" else ("default", None)  # as the launchers run
    env = dict(allocator.preload_env(*malloc, os.environ), PEFT_JAX_ALLOCATOR="default", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, __file__, "--worker", framework, "--cases", case, "--steps", str(steps),
                          "--threads", str(threads)], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{framework} profile of {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(case: str, jax_result: dict, torch_result: dict) -> list[str]:
    lines = [f"**{case}**: step wall time JAX {jax_result['wall_s']:.2f} s, torch {torch_result['wall_s']:.2f} s "
             "(under the profilers).", "",
             "| category (seconds per step) | JAX | torch | JAX - torch |", "|---|---:|---:|---:|"]
    tj, tt = sum(jax_result["seconds"].values()), sum(torch_result["seconds"].values())
    for category in CATEGORIES:
        j, t = jax_result["seconds"].get(category, 0.0), torch_result["seconds"].get(category, 0.0)
        lines.append(f"| {category} | {j:.2f} ({100 * j / tj:.0f}%) | {t:.2f} ({100 * t / tt:.0f}%) | {j - t:+.2f} |")
    lines += [f"| all | {tj:.2f} | {tt:.2f} | {tj - tt:+.2f} |", "",
              f"JAX: {jax_result['note']}; torch: {torch_result['note']}. The heaviest XLA operations: "
              + "; ".join(f"`{name}` {shape} ({category}) {1e3 * seconds:.0f} ms"
                          for name, category, seconds, shape in jax_result["heaviest"]) + ".", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated: " + ", ".join(compare_torch.CPU_CASES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--worker", choices=("jax", "torch"))
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in compare_torch.CPU_CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; valid: {', '.join(compare_torch.CPU_CASES)}")
    if args.worker:
        if args.worker == "torch":
            import torch

            torch.set_num_threads(args.threads)
        profile = jax_profile if args.worker == "jax" else torch_profile
        print(json.dumps(profile(cases[0], args.steps)))
        return
    import jax
    import torch

    lines = [HEADING, "", f"Command: `python benchmarks/profile_step.py {' '.join(sys.argv[1:])}`".rstrip("` ") + "`  ",
             f"Date: {datetime.date.today()}; {os.cpu_count()} CPU cores; jax {jax.__version__}, torch {torch.__version__}; "
             f"batch 8, 224 px, AdamW; {args.steps} profiled steps after 2 warm-up steps. Each cell: the wall time "
             "of the category's operations per step (its share of the framework's total).", ""]
    for case in cases:
        print(f"[profile_step] {case} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        results = {fw: run_worker(fw, case, args.steps, args.threads) for fw in ("jax", "torch")}
        print("\n".join(table(case, results["jax"], results["torch"])), flush=True)
        print(f"[profile_step] {case}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        lines += table(case, results["jax"], results["torch"])
    write_section(pathlib.Path(args.out), HEADING, "\n".join(lines))


if __name__ == "__main__":
    main()
