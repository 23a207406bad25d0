#!/usr/bin/env bash
# The one prepared GPU check, for a lent H100/H200 (device tool), about 8 minutes (at most 14.7 by its timeouts):
#   bash bench/gpu_check.sh            # on the device machine, from the repository root
# 1. the Triton tests compiled for the card (`triton` and `gpu` markers: the big shapes, N·V > 2^31);
# 2. the benchmarks, peers beside our kernels, floors measured in the same run;
# 3. one results table: bench/results/<date>-<card>-gpu_check.md (copied to $OUT when the device tool sets it).
# The machine's own torch/triton are used (no install): the header records their versions.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Peers' wheels carried in .whl/ (device README: carry = [".whl"]): trl, liger-kernel, cut-cross-entropy, and
# what trl needs beyond the machine's image (datasets, ...): bench_train_step and the trl providers skip without them.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

card=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
day=$(date +%F)
table="bench/results/${day}-${card}-gpu_check.md"
log=$(mktemp)
{
  echo "# GPU check, ${day}, ${card}"
  python3 -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}')"
  echo "git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo '## Tests (`pytest -m "triton or gpu"`)'
  echo '```'
  timeout 240 python3 -m pytest -q -m "triton or gpu" -p no:cacheprovider tests 2>&1 | tail -n 15
  echo '```'
  # From hidden: the anchor shape only (4 pairs × 2048 tokens, a quarter prompt: 12288 scored rows, H 4096,
  # V 128256, bf16), each provider in its own process (ours keep_logits=True / False, impl="fused", TRL 1.16's
  # head, plain torch, Cut Cross-Entropy when carried): the parent compiles everything once in its float64 error
  # check, so a provider's process is ~10-20 s; 60 s each at most, 200 s for the whole run.
  for bench in "bench.bench_logprobs" "bench.bench_dpo" \
    "bench.bench_dpo --from-hidden --pairs 4 --T 2048 --V 128256 --H 4096 --child-timeout 60" "bench.bench_train_step"; do
    echo
    echo "## python -m ${bench}"
    echo '```'
    case "$bench" in *--from-hidden*) limit=200 ;; *) limit=150 ;; esac
    timeout "$limit" python3 -m ${bench} --save 2>&1 | tail -n 40
    echo '```'
  done
} 2>&1 | tee "$log"
cp "$log" "$table"
[ -n "${OUT:-}" ] && cp "$log" "$OUT/gpu_check.md" && cp bench/results/"${day}"-* "$OUT/" 2>/dev/null
echo "wrote $table"
