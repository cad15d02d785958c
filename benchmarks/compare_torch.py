"""Train-step throughput of peft_jax against PyTorch (transformers + peft; efficientnet-lite-pytorch), side by side.

    python benchmarks/compare_torch.py                 # every CPU case, writes BENCHMARKS.md
    python benchmarks/compare_torch.py --cases vit_b16_lora_fp32,resnet50_full_fp32 --steps 5
    python benchmarks/compare_torch.py --device gpu --batch 32 --peak_tflops 989   # benchmarks/gpu_check.sh

Each framework runs in its own worker process (same model configuration, batch, resolution,
optimizer and thread count); the parent interleaves their timed steps (one JAX step, one
torch step, ...) so that machine noise hits both alike, and reports medians after warm-up,
the ratio, peak memory (resident set on CPU, device peak on GPU), optimizer-state bytes per
trainable parameter, and for JAX the FLOP utilisation (XLA's cost analysis of the step) against
the matmul ceiling measured in the same run. For the ``--allocator_cases`` more JAX workers run
the same step under each other malloc (tcmalloc, mimalloc, glibc: ``peft_jax/allocator.py``),
interleaved with the rest, into a section of their own. JAX workers compile and dispatch as the
launchers do, with XLA:CPU's concurrency-optimised scheduler off and CPU steps inline
(``peft_jax/xla_cpu.py``); for the ``--scheduler_cases`` one more JAX worker runs with it on (XLA's own default), into another section. The last line printed is one JSON object: per case, ``<case>_speedup`` (torch's step time
over JAX's) and ``<case>_memory_ratio`` (JAX's peak memory in the timed steps over torch's), and for the
scheduler cases ``<case>_concurrency_scheduler_speedup`` and ``<case>_concurrency_scheduler_memory_ratio``, against the
same torch steps.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks_md import cpu_model, gb, write_section  # noqa: E402  (beside this script)
from peft_jax import xla_cpu  # noqa: E402

SIZE = 224
# case -> (model, method, dtype)
CASES = {
    f"{model}_{method}_{dtype}": (model, method, dtype)
    for model, methods, dtypes in (
        ("vit_b16", ("lora", "full", "linear", "ssf", "vpt_deep"), ("fp32", "bf16")),
        ("resnet50", ("full", "ssf", "bn_tune", "lora_conv"), ("fp32",)),
        ("efficientnet_lite0", ("full", "ssf", "bn_tune"), ("fp32",)),
        ("vit_h14", ("lora",), ("bf16",)),
    )
    for method in methods for dtype in dtypes
}
CPU_CASES = [c for c in CASES if not c.startswith("vit_h14")]
GPU_CASES = ["vit_b16_lora_bf16", "vit_h14_lora_bf16"]
SCHEDULER_WORKER = "jax_concurrency_scheduler"  # its worker's name; the other 'jax_<name>' workers are allocators
VIT_DIMS = {"vit_b16": (768, 12, 12, 3072, 16), "vit_h14": (1280, 32, 16, 5120, 14)}  # width, depth, heads, mlp, patch


def settings() -> dict:
    """What the parent passes to its workers (environment, so a worker is one plain command line)."""
    return {"batch": int(os.environ.get("COMPARE_BATCH", "8")), "device": os.environ.get("COMPARE_DEVICE", "cpu")}


# ----------------------------------------------------------------------------- JAX worker


def random_batch(batch_size: int) -> dict:
    """The JAX workers' fixed batch: normal images at SIZE px, binary labels."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    return {"image": jnp.asarray(rng.normal(size=(batch_size, SIZE, SIZE, 3)).astype(np.float32)),
            "label": jnp.asarray(rng.integers(0, 2, batch_size).astype(np.int32))}


def jax_step(model_name: str, method: str, dtype: str):
    """(one_step, compiled, state): a callable that runs one train step and returns its seconds, the
    compiled step (for its cost analysis and its HLO) and the step's state [trainable, frozen, rest, opt]."""
    import jax

    from peft_jax import sharding as shd
    from peft_jax.config import base_config
    from peft_jax.train import builder, step as step_lib
    from peft_jax.train.state import setup

    batch_size = settings()["batch"]
    cfg = base_config()
    cfg.model.name, cfg.model.image_size = model_name, SIZE
    cfg.model.scan_layers = model_name == "vit_h14"  # one compiled block instead of 32
    cfg.peft.method = method
    cfg.train.update(num_steps=1000, warmup_steps=10, grad_clip=0.0, weight_decay=0.01, batch_size=batch_size)
    if dtype == "bf16" and settings()["device"] == "gpu":
        cfg.train.compute_dtype = "bfloat16"
    elif dtype == "bf16":  # bf16 products on float32 activations: XLA:CPU's bf16 elementwise work is slow
        cfg.train.matmul_dtype = "bfloat16"
    built = builder.build(cfg, 2)
    train_state = setup(cfg, built.model, built.trainable, shd.make_mesh(cfg.mesh, jax.devices()[:1]))
    steps = step_lib.compile_steps(train_state, cfg.train)
    state = [train_state.trainable, train_state.frozen, train_state.rest, train_state.opt_state]
    batch = random_batch(batch_size)
    compiled = steps.train.lower(*state, batch).compile()

    def one_step():
        t = time.perf_counter()
        state[0], state[2], state[3], m = compiled(state[0], state[1], state[2], state[3], batch)
        jax.block_until_ready(m["loss"])
        return time.perf_counter() - t

    return one_step, compiled, state


def jax_worker(model_name: str, method: str, dtype: str):
    import jax
    import jax.numpy as jnp

    device = settings()["device"]
    one_step, compiled, state = jax_step(model_name, method, dtype)
    flops = float(compiled.cost_analysis().get("flops", 0.0))
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes  # XLA's scratch buffer for the step
    trainable = sum(x.size for x in jax.tree.leaves(state[0]))
    opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state[3]))

    def ceiling(dt):
        """The best of 5 timings of 10 square products: one timing can read low on a noisy machine."""
        n = 8192 if device == "gpu" else 2048
        a = jnp.ones((n, n), dt)
        f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        f(a, a).block_until_ready()
        best = 0.0
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(10):
                out = f(a, a)
            out.block_until_ready()
            best = max(best, 10 * 2 * n**3 / (time.perf_counter() - t))
        return best

    def memory():
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use") if device == "gpu" else None

    extra = {"flops_per_step": flops, "fp32_ceiling": ceiling(jnp.float32), "bf16_ceiling": ceiling(jnp.bfloat16),
             "opt_bytes_per_param": opt_bytes / trainable, "device_peak_bytes": memory, "xla_temp_bytes": temp_bytes}
    return one_step, extra


# ----------------------------------------------------------------------------- torch worker


def torch_worker(model_name: str, method: str, dtype: str):
    import torch
    import transformers

    batch_size, device = settings()["batch"], "cuda" if settings()["device"] == "gpu" else "cpu"
    torch.manual_seed(0)
    if model_name.startswith("vit"):
        width, depth, heads, mlp, patch = VIT_DIMS[model_name]
        config = transformers.ViTConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                                        intermediate_size=mlp, image_size=SIZE, patch_size=patch, num_labels=2,
                                        layer_norm_eps=1e-6)
        model = transformers.ViTForImageClassification(config)
    elif model_name.startswith("resnet"):
        config = transformers.ResNetConfig(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                                           layer_type="bottleneck", num_labels=2)
        model = transformers.ResNetForImageClassification(config)
    else:  # efficientnet-lite-pytorch, the definition the ImageNet weights come from
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name(model_name.replace("_", "-"), num_classes=2, image_size=SIZE)
    # the head's and the BatchNorms' module names
    head, norm = ("_fc", "._bn") if model_name.startswith("efficientnet") else ("classifier", "normalization")
    if method in ("lora", "lora_conv"):
        import peft

        # peft's Conv2d LoRA is ours: a k x k down-projection to rank r and a 1x1 up-projection, on every
        # convolution inside the residual stages (not the stem).
        targets = ["q_proj", "v_proj"] if method == "lora" else r".*encoder\.stages.*convolution"
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=8, target_modules=targets,
                                                           modules_to_save=[head]))
    elif method == "ssf":
        add_torch_ssf(model, torch, head)
    elif method == "vpt_deep":
        add_torch_vpt_deep(model, torch, num_tokens=10)
    for name, p in model.named_parameters():
        if method == "full":
            p.requires_grad_(True)
        elif method in ("linear", "bn_tune", "ssf", "vpt_deep"):
            trainable = head in name or (method == "bn_tune" and norm in f".{name}") or (
                method == "ssf" and "ssf_" in name) or (method == "vpt_deep" and "vpt_prompts" in name)
            p.requires_grad_(trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    model = model.to(device)
    x = torch.randn(batch_size, 3, SIZE, SIZE, device=device)
    y = torch.randint(0, 2, (batch_size,), device=device)
    if not model_name.startswith("vit"):  # torch's fastest CPU layout for convolutions
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def one_step():
        sync()
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            logits = model(x) if model_name.startswith("efficientnet") else model(pixel_values=x).logits
            loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        return time.perf_counter() - t

    def opt_bytes_per_param():
        state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in state) / sum(p.numel() for p in params)

    def memory():
        return torch.cuda.max_memory_allocated() if device == "cuda" else None

    return one_step, {"opt_bytes_per_param": opt_bytes_per_param, "device_peak_bytes": memory}


def add_torch_vpt_deep(model, torch, num_tokens: int) -> None:
    """A minimal VPT-deep for the reference (peft has none for vision): every ViT layer sees its own
    prompts after the class token; their outputs are dropped before the next layer."""
    width = model.config.hidden_size
    for layer in model.vit.layers:
        layer.vpt_prompts = torch.nn.Parameter(torch.empty(num_tokens, width).uniform_(-0.05, 0.05))

        def insert(mod, args):
            h = args[0]
            prompts = mod.vpt_prompts.to(h.dtype).expand(h.shape[0], -1, -1)
            return (torch.cat([h[:, :1], prompts, h[:, 1:]], dim=1),) + args[1:]

        def remove(mod, args, output):
            return torch.cat([output[:, :1], output[:, 1 + num_tokens:]], dim=1)

        layer.register_forward_pre_hook(insert)
        layer.register_forward_hook(remove)


def add_torch_ssf(model, torch, head: str):
    """A minimal SSF for the reference: scale and shift after every Linear/Conv2d/LayerNorm/BatchNorm2d."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    for name, module in list(model.named_modules()):
        if not isinstance(module, kinds) or head in name:
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


PEAK_WAS_RESET = []


def reset_peak_rss() -> None:
    """Linux: restarts the resident-set high-water mark (VmHWM) of this process."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        PEAK_WAS_RESET.append(True)
    except OSError:
        pass


def peak_rss_since_reset() -> int | None:
    """VmHWM in bytes since ``reset_peak_rss`` (None where it could not be reset)."""
    if not PEAK_WAS_RESET:
        return None
    status = pathlib.Path("/proc/self/status").read_text()
    kb = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(kb) * 1024


def serve_steps(one_step) -> None:
    """A worker's line protocol on stdin/stdout until any other line: 'step' -> its seconds; 'reset_peak' -> null
    (after warm-up: the steps' own peak, not compilation's); 'peak' -> peak RSS bytes since the reset."""
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            print(json.dumps(one_step()), flush=True)
        elif command == "reset_peak":
            reset_peak_rss()
            print(json.dumps(None), flush=True)
        elif command == "peak":
            print(json.dumps(peak_rss_since_reset()), flush=True)
        else:
            break


def worker_main(framework: str, case: str, threads: int) -> None:
    """Line protocol on stdin/stdout: 'step' -> seconds; 'done' -> final JSON."""
    model, method, dtype = CASES[case]
    if framework == "torch":
        import torch

        torch.set_num_threads(threads)
        one_step, extra = torch_worker(model, method, dtype)
    else:
        xla_cpu.set_dispatch()  # as the launchers dispatch (peft_jax/xla_cpu.py)
        one_step, extra = jax_worker(model, method, dtype)
    print("ready", flush=True)
    serve_steps(one_step)
    extra = {k: v() if callable(v) else v for k, v in extra.items()}  # measured after the steps
    extra["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    extra["step_peak_rss_bytes"] = peak_rss_since_reset()
    print(json.dumps(extra), flush=True)


# ----------------------------------------------------------------------------- parent


def start(worker: str, case: str, threads: int, malloc: tuple[str, str | None], xla_flags: str = "") -> subprocess.Popen:
    """worker: 'jax', 'jax_<allocator>' or SCHEDULER_WORKER (JAX under ``malloc``, (name, library), set as the
    launchers set it, with ``xla_flags`` added to XLA_FLAGS before the launchers' scheduler setting) or 'torch'
    (the default allocator)."""
    from peft_jax import allocator

    env = allocator.preload_env(*(("default", None) if worker == "torch" else malloc), os.environ)
    env["PEFT_JAX_ALLOCATOR"] = "default"  # the worker does not re-execute itself
    if worker != "torch":
        env = xla_cpu.scheduler_env({**env, "XLA_FLAGS": f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()})
    if settings()["device"] == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    framework = "torch" if worker == "torch" else "jax"
    proc = subprocess.Popen([sys.executable, __file__, "--worker", framework, "--case", case, "--threads", str(threads)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"{worker} worker for {case} failed to start: {line!r}")
    return proc


def measure(case: str, steps: int, warmup: int, threads: int, mallocs: dict[str, str | None],
            concurrency_scheduler: bool = False) -> dict:
    """``mallocs``: allocator name -> library, the first for the 'jax' worker, each other one for a
    'jax_<name>' worker; ``concurrency_scheduler`` adds SCHEDULER_WORKER (the first allocator, XLA's own scheduler)."""
    (main_name, main_lib), *others = mallocs.items()
    workers = {"jax": start("jax", case, threads, (main_name, main_lib)),
               "torch": start("torch", case, threads, ("default", None))}
    workers.update({f"jax_{name}": start(f"jax_{name}", case, threads, (name, lib)) for name, lib in others})
    if concurrency_scheduler:
        workers[SCHEDULER_WORKER] = start(SCHEDULER_WORKER, case, threads, (main_name, main_lib), SCHEDULER_ON)
    times = {name: [] for name in workers}
    for i in range(warmup + steps):
        if i == warmup:
            for proc in workers.values():
                proc.stdin.write("reset_peak\n")
                proc.stdin.flush()
                proc.stdout.readline()
        for name, proc in workers.items():  # interleaved: noise hits every worker alike
            proc.stdin.write("step\n")
            proc.stdin.flush()
            seconds = json.loads(proc.stdout.readline())
            if i >= warmup:
                times[name].append(seconds)
    batch = settings()["batch"]
    result = {"case": case, "batch": batch, "allocator": main_name}
    for name, proc in workers.items():
        proc.stdin.write("done\n")
        proc.stdin.flush()
        extra = json.loads(proc.stdout.readline())
        proc.wait()
        median = statistics.median(times[name])
        result[name] = {"median_s": median, "images_per_s": batch / median, "times": times[name], **extra}
    result["speedup"] = result["torch"]["median_s"] / result["jax"]["median_s"]
    result["memory_ratio"] = memory_ratio(result["jax"], result["torch"])
    if concurrency_scheduler:
        on = result[SCHEDULER_WORKER]
        on["speedup"], on["memory_ratio"] = result["torch"]["median_s"] / on["median_s"], memory_ratio(on, result["torch"])
    j = result["jax"]
    ceiling = j["bf16_ceiling"] if CASES[case][2] == "bf16" else j["fp32_ceiling"]
    result["jax_utilisation"] = j["flops_per_step"] / j["median_s"] / ceiling
    return result


def memory_ratio(jax_worker_result: dict, torch_worker_result: dict) -> float | None:
    """JAX's peak memory over torch's in the timed steps: the device peak on a GPU (the only place it is
    set), the resident set's peak on CPU."""
    for key in ("device_peak_bytes", "step_peak_rss_bytes"):
        jax_bytes, torch_bytes = jax_worker_result.get(key), torch_worker_result.get(key)
        if jax_bytes and torch_bytes:
            return jax_bytes / torch_bytes
    return None


def write_markdown(results: list[dict], command: str, allocator: str, path: pathlib.Path, peak_tflops: float) -> None:
    """One section per model, so that a run of some models' cases leaves the other models' rows as they are."""
    import jax

    gpu = settings()["device"] == "gpu"
    where = jax.devices()[0].device_kind if gpu else f"{cpu_model()} ({os.cpu_count()} cores)"
    for model in dict.fromkeys(CASES[r["case"]][0] for r in results):
        rows = [r for r in results if CASES[r["case"]][0] == model]
        heading = f"## {'GPU train step' if gpu else 'Train step'} vs PyTorch: {model}"
        write_section(path, heading, model_section(heading, rows, command, allocator, where, peak_tflops, gpu))
    if any(allocator_runs(r)[1:] for r in results):  # other mallocs ran
        write_section(path, ALLOCATOR_HEADING, allocator_markdown(results, command, where))
    if any(SCHEDULER_WORKER in r for r in results):
        write_section(path, SCHEDULER_HEADING, scheduler_markdown(results, command, where))


def model_section(heading: str, results: list[dict], command: str, allocator: str, where: str, peak_tflops: float,
                  gpu: bool) -> str:
    """The markdown of one model's cases: the table, then how FLOP utilisation and scratch are defined."""
    import jax
    import torch
    import transformers

    memory = "device peak GB" if gpu else "peak RSS GB"
    lines = [
        f"{heading} (`benchmarks/compare_torch.py`)",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today()}; {'GPU' if gpu else 'CPU'}: {where}; "
        f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"JAX allocator: {allocator}; batch {results[0]['batch']}, {SIZE} px, AdamW, "
        "medians of interleaved steps after warm-up.",
        "",
        f"| case | JAX img/s | torch img/s | JAX / torch | JAX {memory} | torch {memory} | "
        + ("" if gpu else "peak RSS GB in the timed steps, JAX / torch | JAX scratch GB | ")
        + "optimizer B/param JAX / torch | JAX FLOP utilisation |",
        "|---|---:|---:|---:|---:|---:|" + ("" if gpu else "---:|---:|") + "---:|---:|",
    ]
    for r in results:
        j, t = r["jax"], r["torch"]
        mem_j, mem_t = (j["device_peak_bytes"], t["device_peak_bytes"]) if gpu else (j["peak_rss_bytes"],
                                                                                     t["peak_rss_bytes"])
        lines.append(
            f"| {r['case']} | {j['images_per_s']:.2f} | {t['images_per_s']:.2f} | {r['speedup']:.2f}x | "
            f"{gb(mem_j)} | {gb(mem_t)} | "
            + ("" if gpu else f"{gb(j['step_peak_rss_bytes'])} / {gb(t['step_peak_rss_bytes'])} | "
                              f"{gb(j['xla_temp_bytes'])} | ")
            + f"{j['opt_bytes_per_param']:.2f} / {t['opt_bytes_per_param']:.2f} | "
            f"{100 * r['jax_utilisation']:.0f}% |")
    j = results[0]["jax"]
    lines += ["", f"FLOP utilisation = XLA's cost analysis of the compiled step / step time / the matmul ceiling "
              f"measured in the same run (JAX, square matmuls): fp32 {j['fp32_ceiling'] / 1e9:.0f} GFLOP/s, "
              f"bf16 x bf16 -> fp32 {j['bf16_ceiling'] / 1e9:.0f} GFLOP/s. JAX scratch = the temporary buffer "
              "XLA assigns to the compiled step (`memory_analysis().temp_size_in_bytes`)."]
    if peak_tflops:
        mfu = ", ".join(f"{r['case']} {100 * r['jax']['flops_per_step'] / r['jax']['median_s'] / (peak_tflops * 1e12):.0f}%"
                        for r in results)
        lines += ["", f"MFU against the {peak_tflops:g} TFLOP/s datasheet peak: {mfu}."]
    return "\n".join(lines) + "\n"


ALLOCATOR_HEADING = "## JAX step time by allocator (`benchmarks/compare_torch.py`)"


def allocator_markdown(results: list[dict], command: str, where: str) -> str:
    """The ``--allocator_cases`` table: each allocator's step time against the launchers' choice."""
    lines = [ALLOCATOR_HEADING, "", f"Command: `{command}`  ",
             f"Date: {datetime.date.today()}; CPU: {where}; load average {os.getloadavg()[0]:.1f} at the end; "
             "one worker process per allocator, interleaved steps, medians after warm-up.", "",
             "| case | allocator | JAX img/s | step time / the first row's | peak RSS GB in the timed steps |",
             "|---|---|---:|---:|---:|"]
    for r in results:
        runs = allocator_runs(r)
        if len(runs) == 1:
            continue
        for name, w in runs:
            lines.append(f"| {r['case']} | {name} | {w['images_per_s']:.2f} | {w['median_s'] / r['jax']['median_s']:.2f}x "
                         f"| {gb(w['step_peak_rss_bytes'])} |")
    return "\n".join(lines) + "\n"


def allocator_runs(result: dict) -> list[tuple[str, dict]]:
    """(allocator, worker result) of a case's JAX workers that differ only in their malloc, the main one first."""
    return [(result["allocator"], result["jax"])] + [
        (k.removeprefix("jax_"), v) for k, v in result.items()
        if k.startswith("jax_") and k != SCHEDULER_WORKER and isinstance(v, dict)]


SCHEDULER_ON = f"{xla_cpu.SCHEDULER_FLAG}=true"
SCHEDULER_HEADING = "## JAX step by XLA:CPU scheduler (`benchmarks/compare_torch.py`)"


def scheduler_markdown(results: list[dict], command: str, where: str) -> str:
    """The ``--scheduler_cases`` table: the step as the launchers compile it (scheduler off) and with XLA:CPU's
    concurrency-optimised scheduler (XLA's default), each against the same torch steps."""
    lines = [SCHEDULER_HEADING, "", f"Command: `{command}`  ",
             f"Date: {datetime.date.today()}; CPU: {where}; load average {os.getloadavg()[0]:.1f} at the end; "
             f"`{SCHEDULER_ON}` in the second worker's XLA_FLAGS; its steps interleaved with the launchers' "
             "and torch's, medians after warm-up.", "",
             "| case | scheduler | JAX img/s | step time / the launchers' | JAX / torch | JAX scratch GB | "
             "peak RSS GB in the timed steps | JAX / torch peak RSS |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if SCHEDULER_WORKER not in r:
            continue
        for name, w, speedup, ratio in (("off (the launchers')", r["jax"], r["speedup"], r["memory_ratio"]),
                                        ("concurrency-optimised (XLA's)", r[SCHEDULER_WORKER],
                                         r[SCHEDULER_WORKER]["speedup"], r[SCHEDULER_WORKER]["memory_ratio"])):
            lines.append(f"| {r['case']} | {name} | {w['images_per_s']:.2f} | {w['median_s'] / r['jax']['median_s']:.2f}x "
                         f"| {speedup:.2f}x | {gb(w['xla_temp_bytes'])} | {gb(w['step_peak_rss_bytes'])} | "
                         f"{'' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=None, help="comma-separated (default: every CPU case, or on GPU "
                        f"{','.join(GPU_CASES)}): " + ", ".join(CASES))
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="datasheet peak for an MFU line (bf16)")
    parser.add_argument("--allocator_cases", default="vit_b16_lora_fp32,resnet50_full_fp32",
                        help="cases also timed with JAX under each other installed allocator (CPU only)")
    parser.add_argument("--scheduler_cases", default="",
                        help="cases also timed with XLA:CPU's concurrency-optimised scheduler ('all': every case run)")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--worker", choices=("jax", "torch"))
    parser.add_argument("--case")
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, args.case, args.threads)
        return
    os.environ["COMPARE_BATCH"], os.environ["COMPARE_DEVICE"] = str(args.batch), args.device
    from peft_jax import allocator as malloc

    chosen = malloc.choose(os.environ) if args.device == "cpu" else ("default", None)
    others = {n: f() for n, f in malloc.FINDERS.items() if n != chosen[0]} | {"default": None}
    others = {n: lib for n, lib in others.items() if n != chosen[0] and (lib or n == "default")}
    allocator = f"{chosen[0]} ({chosen[1]})" if chosen[1] else (
        "the platform's" if args.device == "gpu" else "glibc malloc (no tcmalloc or mimalloc installed)")
    cases = (args.cases or ",".join(GPU_CASES if args.device == "gpu" else CPU_CASES)).split(",")
    for flag, names in (("--cases", cases), ("--allocator_cases", args.allocator_cases.split(",")),
                        ("--scheduler_cases", [] if args.scheduler_cases == "all" else args.scheduler_cases.split(","))):
        unknown = [c for c in names if c and c not in CASES]
        if unknown:
            print(f"error: unknown {flag} {', '.join(unknown)}; valid: {', '.join(CASES)}", file=sys.stderr)
            raise SystemExit(2)
    allocator_cases = set(args.allocator_cases.split(",")) if args.allocator_cases and args.device == "cpu" else set()
    scheduler_cases = set() if args.device != "cpu" or not args.scheduler_cases else (
        set(cases) if args.scheduler_cases == "all" else set(args.scheduler_cases.split(",")))
    results = []
    for case in cases:
        print(f"[compare_torch] {case} ...", file=sys.stderr, flush=True)
        mallocs = {chosen[0]: chosen[1], **(others if case in allocator_cases else {})}
        r = measure(case, args.steps, args.warmup, args.threads, mallocs, concurrency_scheduler=case in scheduler_cases)
        print(f"[compare_torch] {case}: JAX {r['jax']['images_per_s']:.2f} img/s, torch "
              f"{r['torch']['images_per_s']:.2f} img/s, {r['speedup']:.2f}x", file=sys.stderr, flush=True)
        results.append(r)
    command = "python benchmarks/compare_torch.py " + " ".join(sys.argv[1:])
    write_markdown(results, command.strip(), allocator, pathlib.Path(args.out), args.peak_tflops)
    summary = {}
    for r in results:
        name = r["case"].removesuffix("_fp32")
        summary[f"{name}_speedup"] = round(r["speedup"], 3)
        summary[f"{name}_memory_ratio"] = None if r["memory_ratio"] is None else round(r["memory_ratio"], 3)
        if SCHEDULER_WORKER in r:
            on = r[SCHEDULER_WORKER]
            summary[f"{name}_concurrency_scheduler_speedup"] = round(on["speedup"], 3)
            summary[f"{name}_concurrency_scheduler_memory_ratio"] = (None if on["memory_ratio"] is None
                                                                      else round(on["memory_ratio"], 3))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
