#!/usr/bin/env bash
# Side-by-side serving benchmark on one machine: slimlm serve (torch, default CPU configuration),
# slimlm serve --backend onnx (when ONNX_DIR is given), and transformers serve --continuous-batching,
# all on the same model directory, measured alternately by `slimlm bench serve`.
#
#   bash benchmarks/serve_compare.sh MODEL_DIR [ONNX_DIR] [-- extra `slimlm bench serve` options]
#
# Prints the bench table and its final JSON line; server logs go to ${LOGDIR:-/tmp/slimlm-serve-compare}.
set -euo pipefail

model=${1:?usage: serve_compare.sh MODEL_DIR [ONNX_DIR] [-- bench options]}
shift
onnx=""
if [[ $# -gt 0 && $1 != "--" ]]; then onnx=$1; shift; fi
[[ ${1:-} == "--" ]] && shift
logdir=${LOGDIR:-/tmp/slimlm-serve-compare}
mkdir -p "$logdir"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

start() {  # start NAME PORT CMD...
  local name=$1 port=$2; shift 2
  "$@" >"$logdir/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 600); do
    if curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 \
        || curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "$name did not come up; see $logdir/$name.log" >&2
  exit 1
}

urls=() models=()
start slimlm 8021 slimlm serve "$model" --port 8021 --served-model-name m
urls+=(http://127.0.0.1:8021) models+=(--model m)
if [[ -n $onnx ]]; then
  start slimlm-onnx 8022 slimlm serve "$onnx" --backend onnx --port 8022 --served-model-name m
  urls+=(http://127.0.0.1:8022) models+=(--model m)
fi
start transformers 8023 transformers serve "$model" --continuous-batching --port 8023
urls+=(http://127.0.0.1:8023) models+=(--model "$model")

slimlm bench serve "${urls[@]}" "${models[@]}" "$@"
