#!/usr/bin/env bash
# The checks that need a CUDA device, which CI lacks: the CUDA-marked tests (LoRA weights on the model's
# device, float32 LoRA under bf16 and fp16 autocast, peak memory reset at the start of a run, FSDP through
# configs/distributed/fsdp.yaml against a plain run: tests/test_fsdp.py), then a
# short bf16 benchmark of LoRA against full fine-tuning on a roberta-base-shaped model.
#
#   scripts/gpu_check.sh              # STEPS=50 scripts/gpu_check.sh for steadier throughput figures
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
fi

"$PY" - <<'PYEOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device is visible")
print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PYEOF

# -rs: a CUDA test skipped on a machine with a GPU would say why.
"$PY" -m pytest -q -rs -m cuda tests/
"$PY" scripts/gpu_bench_train.py --device cuda --steps "${STEPS:-20}"
