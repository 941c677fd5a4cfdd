#!/usr/bin/env bash
# `make plan-demo`: what the planner decides for a large model on spot capacity, on built-in
# defaults, without starting any process.
set -euo pipefail
venv=${1:-.venv}
bin="$venv/bin"
echo "== The model: Llama-3.1-70B (bf16) =="
"$bin/spotserve" model-info llama-3.1-70b
echo
echo "== Serving it at 2 req/s on 4 spot g6e.12xlarge (4x L40S each) =="
"$bin/spotserve" plan --model llama-3.1-70b --gpu L40S --instances 4 --gpus-per-instance 4 \
  --rate 2 || true
echo
echo "== A notice on node-1 of an OPT-6.7B deployment (examples/plan/preemption.yaml) =="
"$bin/spotserve" plan examples/plan/preemption.yaml
