#!/usr/bin/env bash
# `make demo`: what spotserve decides for a model on spot capacity, on built-in defaults.
set -euo pipefail
venv=${1:-.venv}
bin="$venv/bin"
echo "== The model: Llama-3.1-70B (bf16) =="
"$bin/spotserve" model-info llama-3.1-70b
