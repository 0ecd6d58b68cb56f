#!/usr/bin/env bash
# Test dgtune at the LOW end of its dependency ranges (pyproject.toml); the high end is the dev venv
# (`pip install -e ".[dev]"` resolves the newest). Creates a venv with the floors, then runs a test subset there.
#
#     bash eval/ci/test_low_pins.sh [VENV=/tmp/venv-low] [pytest args...]
#
# torch 2.13.0 first (pip keeps the wheel you chose). Default tests: objective (vs model.forward), sampler (vs
# transformers' generate()), chunked loss + gradient checkpointing, sliding window, CLI (train/resume/eval/export).
set -euo pipefail
VENV="${1:-/tmp/venv-low}"; shift || true
TESTS=("$@"); [ ${#TESTS[@]} -eq 0 ] && TESTS=(tests/test_objective.py tests/test_sampler.py tests/test_chunked_loss.py
                                               tests/test_sliding_window.py tests/test_cli.py)
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q "transformers==5.17.0" "datasets==4.3.0" "peft==0.18.0" "accelerate==1.10.0" \
      "hydra-core==1.3.2" "omegaconf==2.3.0" "wandb==0.22.0" "matplotlib==3.9.0" "pytest==9.2.0" \
      "tokenizers>=0.22" "safetensors>=0.6" "tqdm>=4.66" "numpy>=2.0"  # these four resolve to their newest
fi
"$VENV/bin/python" -c "import torch, transformers, datasets, peft, accelerate; print('[low pins] torch', torch.__version__,
'transformers', transformers.__version__, 'datasets', datasets.__version__, 'peft', peft.__version__, 'accelerate',
accelerate.__version__)"
PYTHONPATH="$PWD" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    "$VENV/bin/python" -m pytest -q "${TESTS[@]}"
