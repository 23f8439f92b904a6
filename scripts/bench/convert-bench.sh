#!/usr/bin/env bash
# Conversion speed and memory on a 2B-4T-shaped bf16 directory, against simply reading the
# input and writing the output's bytes, in one run (issue 5, acceptance 3).
#
#   scripts/bench/convert-bench.sh SRC_DIR [OUT_DIR] [--to tq2_0]
#
# SRC_DIR: a directory from scripts/bench/make_synthetic_2b4t.py (4.8 GB of bf16). Page caches
# are dropped before each step when this runs as root, so both read from disk alike; otherwise
# both read what the cache holds. Prints the seconds of each, their ratio and the converter's
# peak RSS (GNU time).
set -euo pipefail
src=${1:?usage: convert-bench.sh SRC_DIR [OUT_DIR] [--to TYPE]}
out=${2:-$(mktemp -d)}
to=${4:-tq2_0}
bin=${BITNET_BIN:-target/release/bitnet}
drop() { sync; [ -w /proc/sys/vm/drop_caches ] && echo 3 > /proc/sys/vm/drop_caches || true; }

in_bytes=$(du -cb "$src"/*.safetensors | tail -1 | cut -f1)
# One untimed conversion learns the output size; the baseline writes as many bytes, with the
# same fsync at the end.
"$bin" convert "$src" -o "$out/model.gguf" --to "$to" > /dev/null 2>&1
out_bytes=$(stat -c %s "$out/model.gguf")
rm -f "$out/model.gguf"
drop
t0=$(date +%s.%N)
cat "$src"/*.safetensors > /dev/null
dd if=/dev/zero of="$out/baseline.bin" bs=1M count=$((out_bytes >> 20)) conv=fsync status=none
t1=$(date +%s.%N)
rm -f "$out/baseline.bin"
drop
/usr/bin/time -f "%e %M" -o "$out/time.txt" "$bin" convert "$src" -o "$out/model.gguf" --to "$to" 2> /dev/null > /dev/null
read conv_s rss_kb < "$out/time.txt"
base_s=$(echo "$t1 - $t0" | bc -l)
printf 'input %.2f GB, output %.2f GB\n' "$(echo "$in_bytes/1000000000" | bc -l)" "$(echo "$out_bytes/1000000000" | bc -l)"
printf 'read input + write output bytes: %.1f s\n' "$base_s"
printf 'bitnet convert --to %s:          %.1f s (%.2fx), peak RSS %.0f MiB\n' "$to" "$conv_s" "$(echo "$conv_s/$base_s" | bc -l)" "$(echo "$rss_kb/1024" | bc -l)"
