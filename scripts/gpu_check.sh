#!/usr/bin/env bash
# One GPU check, one command (see scripts/gpu_check.py): tests on CUDA, the ViT-B/16 bf16 +
# torch.compile benchmark and, if data/fashion-mnist holds the IDX files, a short DSeq vs I-JEPA
# pretraining run; results in results/gpu/. Extra arguments go to gpu_check.py (e.g. --dry).
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/gpu_check.py "$@"
