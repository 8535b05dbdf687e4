#!/usr/bin/env bash
# The CUDA checks of this project in one short script (for a machine with one NVIDIA GPU):
# nccl under torchrun, a bf16 training run through train.py, generation on CUDA, and the side-by-side
# benchmark (fp32 / fp16 / bf16, ours and the reference). Figures go to ${OUT:-bench-out}.
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

# 1. nccl + bf16 training through the real CLI, then generation from its snapshot.
work=$(mktemp -d)
$PY - "$work" <<'PYEOF'
import sys, numpy as np, PIL.Image, os
root = sys.argv[1]; os.makedirs(f'{root}/img', exist_ok=True)
rng = np.random.default_rng(0)
for i in range(64):
    PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(f'{root}/img/{i:03d}.png')
PYEOF
$PY dataset_tool.py --source="$work/img" --dest="$work/data.zip" >/dev/null
timeout 120 $PY -m torch.distributed.run --standalone --nproc_per_node=1 train.py --outdir="$work/runs" --name=gpu \
    --data="$work/data.zip" --cbase=32 --cres=1,2 --nblock=1 --batch=64 --duration=0.002 --tick=0.5 --snap=1 \
    --dump=2 --pfgmpp=1 --aug_dim=128 --precision=bf16 --device=cuda --workers=1 --seed=0 2>&1 | tail -5
timeout 60 $PY generate.py --network="$(ls "$work"/runs/gpu/network-snapshot-*.pkl | tail -1)" --outdir="$work/gen" \
    --seeds=0-255 --batch=128 --device=cuda 2>&1 | tail -2

# 2. Side-by-side benchmark at the paper's CIFAR-10 scale.
timeout 240 $PY -m bench.run --device=cuda --batch=512 --sample-batch=512 --repeats=3 --json "$OUT/bench-cuda.json" 2>&1
