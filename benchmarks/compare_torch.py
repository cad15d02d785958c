"""Train-step throughput of peft_jax against PyTorch (transformers + peft), side by side.

    python benchmarks/compare_torch.py                 # all cases, writes BENCHMARKS.md
    python benchmarks/compare_torch.py --cases vit_b16_lora_fp32,resnet50_full_fp32 --steps 5

Each framework runs in its own worker process (same model configuration, batch, resolution,
optimizer and thread count); the parent interleaves their timed steps (one JAX step, one
torch step, ...) so that machine noise hits both alike, and reports medians after warm-up,
the ratio, peak resident memory, and for JAX the FLOP utilisation against the matmul
ceiling measured in the same run. The last line printed is one JSON object of speedups.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks_md import write_section  # noqa: E402  (beside this script)

BATCH, SIZE = 8, 224
# case -> (model, method, dtype)
CASES = {
    f"{model}_{method}_{dtype}": (model, method, dtype)
    for model, methods, dtypes in (
        ("vit_b16", ("lora", "full", "linear", "ssf"), ("fp32", "bf16")),
        ("resnet50", ("full", "ssf", "bn_tune"), ("fp32",)),
    )
    for method in methods for dtype in dtypes
}


# ----------------------------------------------------------------------------- JAX worker


def jax_worker(model_name: str, method: str, dtype: str):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from peft_jax.config import base_config
    from peft_jax.train import builder, optim, step as step_lib
    from peft_jax import sharding as shd

    cfg = base_config()
    cfg.model.name, cfg.model.image_size = model_name, SIZE
    cfg.peft.method = method
    cfg.train.update(num_steps=1000, warmup_steps=10, grad_clip=0.0, weight_decay=0.01)
    if dtype == "bf16":
        cfg.train.compute_dtype = "bfloat16"
    built = builder.build(cfg, 2)
    split = step_lib.split_model(built.model, built.trainable)
    tx = optim.make_optimizer(cfg.train)
    mesh = shd.make_mesh(cfg.mesh)
    steps = step_lib.compile_steps(split, tx, jax.eval_shape(tx.init, split.trainable), mesh,
                                   min_shard_size=cfg.mesh.min_shard_size, label_smoothing=0.0)
    state = [split.trainable, split.frozen, split.rest, tx.init(split.trainable)]
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)),
             "label": jnp.asarray(rng.integers(0, 2, BATCH).astype(np.int32))}
    compiled = steps.train.lower(*state, batch).compile()
    flops = float(compiled.cost_analysis().get("flops", 0.0))

    def one_step():
        t = time.perf_counter()
        state[0], state[2], state[3], m = steps.train(state[0], state[1], state[2], state[3], batch)
        jax.block_until_ready(m["loss"])
        return time.perf_counter() - t

    def ceiling(dt):
        a = jnp.ones((2048, 2048), dt)
        f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        f(a, a).block_until_ready()
        t = time.perf_counter()
        for _ in range(10):
            out = f(a, a)
        out.block_until_ready()
        return 10 * 2 * 2048**3 / (time.perf_counter() - t)

    extra = {"flops_per_step": flops, "fp32_ceiling": ceiling(jnp.float32), "bf16_ceiling": ceiling(jnp.bfloat16)}
    return one_step, extra


# ----------------------------------------------------------------------------- torch worker


def torch_worker(model_name: str, method: str, dtype: str):
    import torch
    import transformers

    torch.manual_seed(0)
    if model_name.startswith("vit"):
        config = transformers.ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                        intermediate_size=3072, image_size=SIZE, patch_size=16, num_labels=2,
                                        layer_norm_eps=1e-6)
        model = transformers.ViTForImageClassification(config)
        head = "classifier"
    else:
        config = transformers.ResNetConfig(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                                           layer_type="bottleneck", num_labels=2)
        model = transformers.ResNetForImageClassification(config)
        head = "classifier"
    if method == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           modules_to_save=[head]))
    elif method == "ssf":
        add_torch_ssf(model, torch)
    for name, p in model.named_parameters():
        if method == "full":
            p.requires_grad_(True)
        elif method in ("linear", "bn_tune", "ssf"):
            trainable = head in name or (method == "bn_tune" and "normalization" in name) or (
                method == "ssf" and "ssf_" in name)
            p.requires_grad_(trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    y = torch.randint(0, 2, (BATCH,))
    if model_name.startswith("resnet"):  # torch's fastest CPU layout for convolutions
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()

    def one_step():
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    return one_step, {}


def add_torch_ssf(model, torch):
    """A minimal SSF for the reference: scale and shift after every Linear/Conv2d/LayerNorm/BatchNorm2d."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    for name, module in list(model.named_modules()):
        if not isinstance(module, kinds) or "classifier" in name:
            continue
        channels = module.out_features if isinstance(module, torch.nn.Linear) else (
            module.out_channels if isinstance(module, torch.nn.Conv2d) else (
                module.normalized_shape[0] if isinstance(module, torch.nn.LayerNorm) else module.num_features))
        module.ssf_scale = torch.nn.Parameter(torch.ones(channels))
        module.ssf_shift = torch.nn.Parameter(torch.zeros(channels))
        conv = isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d))

        def hook(mod, inputs, output, conv=conv):
            shape = (1, -1, 1, 1) if conv else (-1,)
            return output * mod.ssf_scale.view(shape) + mod.ssf_shift.view(shape)

        module.register_forward_hook(hook)


def worker_main(framework: str, case: str, threads: int) -> None:
    """Line protocol on stdin/stdout: 'step' -> seconds; 'done' -> final JSON."""
    model, method, dtype = CASES[case]
    if framework == "torch":
        import torch

        torch.set_num_threads(threads)
        one_step, extra = torch_worker(model, method, dtype)
    else:
        one_step, extra = jax_worker(model, method, dtype)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            print(json.dumps(one_step()), flush=True)
        else:
            break
    extra["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(extra), flush=True)


# ----------------------------------------------------------------------------- parent


def start(framework: str, case: str, threads: int, tcmalloc: str | None) -> subprocess.Popen:
    env = dict(os.environ, PEFT_JAX_TCMALLOC="0")
    env.pop("LD_PRELOAD", None)
    if tcmalloc:
        env["LD_PRELOAD"] = tcmalloc
    proc = subprocess.Popen([sys.executable, __file__, "--worker", framework, "--case", case, "--threads", str(threads)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"{framework} worker for {case} failed to start: {line!r}")
    return proc


def measure(case: str, steps: int, warmup: int, threads: int, tcmalloc: str | None) -> dict:
    workers = {fw: start(fw, case, threads, tcmalloc if fw == "jax" else None) for fw in ("jax", "torch")}
    times = {fw: [] for fw in workers}
    for i in range(warmup + steps):
        for fw, proc in workers.items():  # interleaved: noise hits both frameworks alike
            proc.stdin.write("step\n")
            proc.stdin.flush()
            seconds = json.loads(proc.stdout.readline())
            if i >= warmup:
                times[fw].append(seconds)
    result = {"case": case}
    for fw, proc in workers.items():
        proc.stdin.write("done\n")
        proc.stdin.flush()
        extra = json.loads(proc.stdout.readline())
        proc.wait()
        median = statistics.median(times[fw])
        result[fw] = {"median_s": median, "images_per_s": BATCH / median, "times": times[fw], **extra}
    result["speedup"] = result["torch"]["median_s"] / result["jax"]["median_s"]
    j = result["jax"]
    ceiling = j["bf16_ceiling"] if CASES[case][2] == "bf16" else j["fp32_ceiling"]
    result["jax_utilisation"] = j["flops_per_step"] / j["median_s"] / ceiling
    return result


def write_markdown(results: list[dict], command: str, allocator: str, path: pathlib.Path) -> None:
    import jax
    import torch
    import transformers

    lines = [
        "## Train step vs PyTorch (`benchmarks/compare_torch.py`)",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today()}; CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores); "
        f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"JAX allocator: {allocator}; batch {BATCH}, {SIZE} px, AdamW, medians of interleaved steps after warm-up.",
        "",
        "| case | JAX img/s | torch img/s | JAX / torch | JAX peak RSS GB | torch peak RSS GB | JAX FLOP utilisation |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['case']} | {r['jax']['images_per_s']:.2f} | {r['torch']['images_per_s']:.2f} | "
            f"{r['speedup']:.2f}x | {r['jax']['peak_rss_bytes'] / 1e9:.2f} | {r['torch']['peak_rss_bytes'] / 1e9:.2f} | "
            f"{100 * r['jax_utilisation']:.0f}% |")
    if results:
        j = results[0]["jax"]
        lines += ["", f"Matmul ceilings measured in the same run (2048^3, JAX): fp32 {j['fp32_ceiling'] / 1e9:.0f} "
                  f"GFLOP/s, bf16 x bf16 -> fp32 {j['bf16_ceiling'] / 1e9:.0f} GFLOP/s."]
    write_section(path, "## Train step vs PyTorch", "\n".join(lines) + "\n")

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--worker", choices=("jax", "torch"))
    parser.add_argument("--case")
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, args.case, args.threads)
        return
    from peft_jax.runtime import find_tcmalloc

    tcmalloc = find_tcmalloc()
    allocator = f"tcmalloc ({tcmalloc})" if tcmalloc else "glibc malloc (libtcmalloc-minimal4 not installed)"
    results = []
    for case in args.cases.split(","):
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}; valid: {', '.join(CASES)}")
        print(f"[compare_torch] {case} ...", file=sys.stderr, flush=True)
        r = measure(case, args.steps, args.warmup, args.threads, tcmalloc)
        print(f"[compare_torch] {case}: JAX {r['jax']['images_per_s']:.2f} img/s, torch "
              f"{r['torch']['images_per_s']:.2f} img/s, {r['speedup']:.2f}x", file=sys.stderr, flush=True)
        results.append(r)
    command = "python benchmarks/compare_torch.py " + " ".join(sys.argv[1:])
    write_markdown(results, command.strip(), allocator, pathlib.Path(args.out))
    summary = {f"{r['case'].removesuffix('_fp32')}_speedup": round(r["speedup"], 3) for r in results}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
