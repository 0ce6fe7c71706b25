#!/usr/bin/env bash
# The GPU benchmark in one command (<= 8 minutes on one GPU; random weights; no downloads):
#
#   bash benchmarks/gpu.sh [--smoke] [OUT.jsonl]
#
# For float32 and bfloat16: reward-model forward (ViT-L/16-384) per sample and its MFU, the head
# on cached tokens, a full GRPO step (batch 2, K 8, group 4, full DCEvo: time, FLOP floor, peak
# memory) and DCEvo fusion throughput at 480x640. Each part runs in a fresh process, so each
# peak-memory figure is that part's own. --smoke: tiny geometry, to check the script on a CPU.
# Results: one JSON line per part on stdout and in OUT.jsonl (default $TMPDIR or /tmp/evafusion_gpu_bench.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=()
limit=200   # seconds per part on a GPU (guard; a part takes ~1 min)
if [[ "${1:-}" == "--smoke" ]]; then smoke=(--smoke); limit=900; shift; fi
out="${1:-${TMPDIR:-/tmp}/evafusion_gpu_bench.jsonl}"
: > "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # so that peak memory is what the part used
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import jax; print('devices:', jax.devices())"
for dtype in float32 bfloat16; do
  for part in reward grpo fuse; do
    timeout "$limit" python benchmarks/gpu.py --part "$part" --dtype "$dtype" --json-out "$out" "${smoke[@]}" \
      || echo "{\"part\": \"$part\", \"dtype\": \"$dtype\", \"error\": \"failed or over $limit s\"}" | tee -a "$out"
  done
done
echo "results in $out"
