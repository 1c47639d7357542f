#!/usr/bin/env bash
# The project's one-command GPU check: at most ~8 minutes on one GPU, no network, synthetic data only.
#
#   bash tools/gpu_check.sh            # from the repository root, on a machine with a CUDA GPU
#
# Steps (each under its own time limit; a failed step is reported and the next one still runs):
#   1. the CUDA tests (tests whose name says cuda/gpu; they are skipped on CPU-only machines)
#   2. bench_train: CUDA rows of every preset, with and without AMP (1 GPU)
#   3. bench_matching and bench_ranking on CUDA
#   4. a short training of the deformable R50 at COCO resolution (800 px) with AMP, on generated shapes images
# One summary at the end. PYTHON picks the interpreter (default: .venv/bin/python if it exists, else python3).
# Missing wheels (pycocotools, POT, hotcoco, ...) can be put in .whl/ (git-ignored through .git/info/exclude): they
# are installed into /tmp/site first, without network.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
LOG_DIR=${GPU_CHECK_DIR:-runs/gpu_check}
mkdir -p "$LOG_DIR"
declare -a SUMMARY

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  SUMMARY+=("$(printf '%-16s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - start))")")
}

"$PYTHON" - <<'EOF' || { echo "no usable CUDA device: nothing to check"; exit 1; }
import torch
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {torch.cuda.get_device_name(0)}")
EOF

step cuda_tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider -k "cuda or gpu" tests
step bench_train 150 "$PYTHON" tools/bench_train.py --no-cpu --iters 10 --warmup 3 --json "$LOG_DIR/bench_train.json"
step bench_matching 60 "$PYTHON" tools/bench_matching.py --device cuda
step bench_ranking 60 "$PYTHON" tools/bench_ranking.py --device cuda
step deformable_r50 150 "$PYTHON" tools/train.py --config configs/deformable_r50_coco.yaml \
  output_dir="$LOG_DIR/deformable_r50" model.pretrained=false train.amp=true device=cuda \
  data.dataset=shapes data.transforms=shapes data.root=datasets/gpu_check_800 data.train_split=train \
  data.val_split=val data.shapes.num_train=64 data.shapes.num_val=16 data.shapes.min_size=600 \
  data.shapes.max_size=800 data.shapes.max_objects=8 data.batch_size=2 data.eval_batch_size=2 data.num_workers=4 \
  train.epochs=1 train.max_iters_per_epoch=30 train.print_freq=10 log.tensorboard=false

echo
echo "=== summary ($("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))'))"
printf '%s\n' "${SUMMARY[@]}"
grep -h -E "AP|images/s|it/s" "$LOG_DIR/deformable_r50.log" 2>/dev/null | tail -3
