#!/usr/bin/env bash
# One prepared GPU check (an H200 machine): ViT-B/16 and ViT-H/14 LoRA (r8 on q, v) train steps in bf16,
# peft_jax against transformers + peft from the same machine, interleaved, at 224 px; images/s, peak device
# memory, FLOP utilisation and MFU against the H200's bf16 datasheet peak (989 TFLOP/s dense).
# Writes the "GPU train step vs PyTorch" section of BENCHMARKS.md and prints one JSON line of speedups.
# Usage: bash benchmarks/gpu_check.sh [batch]      (about 5-8 minutes including installs)
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH="${1:-32}"
python -c "import jax; assert jax.default_backend() == 'gpu'" 2>/dev/null || pip install -q -e ".[gpu]"
python -c "import torch, transformers, peft; assert torch.cuda.is_available()" 2>/dev/null \
  || pip install -q "transformers==5.24.0" "peft==0.21.2"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python benchmarks/compare_torch.py --device gpu --batch "$BATCH" --steps 10 --warmup 3 --peak_tflops 989
