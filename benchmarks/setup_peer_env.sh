#!/usr/bin/env bash
# Creates the peer environment for `bench_update.py`: TRL 1.12 (the last TRL with `trl.experimental.ppo.PPOTrainer`)
# in its OWN virtualenv, never a dependency of srppo-trl. torch, transformers, accelerate and datasets are pinned to the
# same versions as the main environment, so the comparison measures the trainers, not the libraries.
#
#   bash benchmarks/setup_peer_env.sh [VENV_DIR]        # default: /work/.venv-trl112 (or $PEER_VENV)
#
# The peer script imports `srppo_trl.coherent_reward` from this checkout's `src/` (it needs torch alone).
set -euo pipefail
VENV="${1:-${PEER_VENV:-/work/.venv-trl112}}"
PYTHON="${PYTHON:-python3}"
HERE="$(cd "$(dirname "$0")" && pwd)"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
# `-c`: whatever pip resolves, these never move (an unpinned torch would pull a multi-GB CUDA build).
cat > "$CONSTRAINTS" <<'PINS'
torch==2.13.0
trl==1.12.0
transformers==5.23.0
accelerate==1.15.0
datasets==5.2.0
safetensors==0.8.0
tokenizers==0.23.3
huggingface_hub==2.4.0
numpy==2.4.6
PINS
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# CPU build of torch first: from pip's configured find-links/index (a local wheel on these machines); elsewhere set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu so pip does not pull the CUDA build.
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "torch==2.13.0"
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" "trl==1.12.0" "transformers==5.23.0" "accelerate==1.15.0" \
    "datasets==5.2.0" psutil
"$VENV/bin/python" - <<'PY'
import torch, transformers, trl
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: F401 - fails loudly if the peer is missing
print(f"peer env ok: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
PY
echo "peer venv: $VENV (run: $VENV/bin/python $HERE/peer_trl112_ppo.py --help)"
