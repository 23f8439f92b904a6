#!/usr/bin/env bash
# `bitnet train --device cuda` on an NVIDIA GPU machine (CUDA 13 driver, a PyTorch cu130 install
# for its CUDA libraries and for the comparison), from a binary built elsewhere by
# scripts/build-cuda.sh. What it runs, in order:
#   1. the PyTorch reference (testdata/golden/train) on the GPU, in f64 and f32, checked by
#      scripts/golden/compare_train_curve.py against transformers' own curve;
#   2. the demo model's config (scripts/train/shakespeare.toml) for STEPS steps on the GPU, and
#      PyTorch's step on the same shape on the same GPU (scripts/bench/train_step_torch.py);
#   3. with FULL=1, the whole demo run (TQ2_0 export and held-out perplexity).
#
#   bash scripts/gpu/train-cuda.sh [OUTDIR]      # STEPS=40 FULL=0; BITNET=path (else carry/bitnet-cuda.xz)
# The corpus must be at target/corpus (scripts/train-demo-model.sh fetches it).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-${OUT:-target/gpu-out}}
mkdir -p "$out"
bin=${BITNET:-}
if [ -z "$bin" ]; then
  bin=/tmp/bitnet-cuda
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    carry/bitnet-cuda.xz "$bin"
  chmod +x "$bin"
fi
steps=${STEPS:-40}
py=${PYTHON:-python3}

# CUDA 13's libraries where PyTorch keeps them (pip's nvidia-* wheels), unless already found.
lib=$("$py" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
[ -n "$lib" ] && export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
"$py" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$out/gpu.txt"

# Each section runs even when one before it failed; the exit status says whether any did.
set +e
status=0
fail() { echo "FAILED: $*"; status=1; }

echo "== 1. the PyTorch reference on the GPU"
# (AdamW's betas are the default 0.9,0.95.)
ref=(--init testdata/models/tiny-bitnet-a-float --data testdata/golden/train/data.npy
  --steps 50 --batch-size 4 --lr 0.003 --min-lr 0.0003 --weight-decay 0.1
  --eps 1e-8 --warmup 5 --schedule cosine --grad-clip 1 --no-export --quiet)
for p in f64 f32; do
  "$bin" train --device cuda "${ref[@]}" --precision "$p" -o "/tmp/ref-$p" --metrics "$out/ref-$p.csv" \
    >"$out/ref-$p.log" 2>&1 || fail "reference run $p: $(tail -3 "$out/ref-$p.log")"
done
"$py" scripts/golden/compare_train_curve.py f64 "$out/ref-f64.csv" f32 "$out/ref-f32.csv" | tee "$out/reference.txt"
[ "${PIPESTATUS[0]}" = 0 ] || fail "the reference comparison"

echo "== 2. the demo model's shape: bitnet train (f32, TF32, bf16, bf16 masters) and PyTorch, same GPU"
for mode in "" "--tf32" "--precision bf16" "--precision bf16-masters"; do
  rm -rf /tmp/shk
  echo "bitnet train ${mode:-f32}:" | tee -a "$out/throughput.txt"
  "$bin" train -c scripts/train/shakespeare.toml --device cuda $mode -o /tmp/shk --stop-after "$steps" \
    --no-export --quiet >/tmp/shk.log 2>&1 || fail "bitnet train $mode: $(tail -3 /tmp/shk.log)"
  grep -E '^(training|done)' /tmp/shk.log | tee -a "$out/throughput.txt"
done
for f in "" --float; do
  "$py" scripts/bench/train_step_torch.py --device cuda --steps "$steps" $f 2>&1 | tail -3 | tee -a "$out/throughput.txt"
done

if [ "${FULL:-0}" = 1 ]; then
  echo "== 3. the whole demo run on the GPU"
  rm -rf /tmp/shk-full
  "$bin" train -c scripts/train/shakespeare.toml --device cuda ${FULL_FLAGS:-} -o /tmp/shk-full --quiet \
    >"$out/full.txt" 2>&1 || fail "the whole demo run: $(tail -3 "$out/full.txt")"
  tail -4 "$out/full.txt"
  cp /tmp/shk-full/model.gguf "$out/" 2>/dev/null
  cp /tmp/shk-full/eval.csv "$out/full-eval.csv" 2>/dev/null
fi
exit $status
