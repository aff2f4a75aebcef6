#!/usr/bin/env bash
# Single-node SFT: one torchrun over the node's GPUs (or CPU processes), driven by the YAML config.
#   CONFIG=examples/configs/devstral_audio_sft.yaml NPROC=8 launch_scripts/train_single_node.sh [key=value ...]
#   DRY_RUN=1 ... validates config, checkpoint metadata, tokenizer, layout and data for NPROC ranks, no GPU needed.
# Extra arguments are dotted config overrides passed to tools/train.py.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-examples/configs/tiny_cpu.yaml}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)  # 0 without nvidia-smi (wc prints it; pipefail fails the pipe)
if [ -z "${NPROC:-}" ]; then
  NPROC=$GPUS
  [ "$NPROC" -gt 0 ] || NPROC=1
fi
DRY_RUN=${DRY_RUN:-0}

if [ "$DRY_RUN" = 1 ]; then
  exec "$PYTHON" tools/train.py --config "$CONFIG" --dry-run --world-size "$NPROC" "$@"
fi

# CPU runs: one thread per rank keeps ranks from fighting over cores.
[ "$GPUS" -gt 0 ] || export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
set -x
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$NPROC" \
  tools/train.py --config "$CONFIG" "$@"
