#!/usr/bin/env bash
# Conversion speed and memory on a 2B-4T-shaped bf16 directory, against simply reading the
# input and writing the output's bytes, in one run (issue 5, acceptance 3).
#
#   scripts/bench/convert-bench.sh SRC_DIR [OUT_DIR] [TYPE] [ROUNDS]
#
# SRC_DIR: a directory from scripts/bench/make_synthetic_2b4t.py (4.8 GB of bf16). TYPE is the
# ternary type (tq2_0). Each round times, interleaved:
#   warm: the input already in the page cache (a second conversion, or one right after a
#         download) -- baseline `cat` of the input + `dd` of as many output bytes with fsync,
#         then `bitnet convert` (which also fsyncs before its rename);
#   cold: the same after dropping the page cache (only when run as root), so both read the
#         disk.
# Prints each time, the median ratio per mode and the converter's peak RSS (GNU time).
set -euo pipefail
src=${1:?usage: convert-bench.sh SRC_DIR [OUT_DIR] [TYPE] [ROUNDS]}
out=${2:-$(mktemp -d)}
to=${3:-tq2_0}
rounds=${4:-3}
bin=${BITNET_BIN:-target/release/bitnet}
can_drop=0
[ -w /proc/sys/vm/drop_caches ] && can_drop=1
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }

in_bytes=$(du -cb "$src"/*.safetensors | tail -1 | cut -f1)
# One untimed conversion learns the output size; the baseline writes as many bytes.
"$bin" convert "$src" -o "$out/model.gguf" --to "$to" > /dev/null 2>&1
out_bytes=$(stat -c %s "$out/model.gguf")
rm -f "$out/model.gguf"
printf 'input %.2f GB, output %.2f GB, %s rounds\n' "$(echo "$in_bytes/1000000000" | bc -l)" \
    "$(echo "$out_bytes/1000000000" | bc -l)" "$rounds"

baseline() {
    local t0 t1
    t0=$(now)
    cat "$src"/*.safetensors > /dev/null
    dd if=/dev/zero of="$out/baseline.bin" bs=1M count=$((out_bytes >> 20)) conv=fsync status=none
    t1=$(now)
    rm -f "$out/baseline.bin"
    sync
    echo "$t1 - $t0" | bc -l
}
convert() {
    /usr/bin/time -f "%e %M" -o "$out/time.txt" "$bin" convert "$src" -o "$out/model.gguf" \
        --to "$to" > /dev/null 2>&1
    rm -f "$out/model.gguf"
    sync
    cat "$out/time.txt"
}
median() { sort -g | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }

modes="warm"
[ "$can_drop" = 1 ] && modes="warm cold"
for mode in $modes; do
    : > "$out/ratios.$mode"
    rss=0
    for r in $(seq "$rounds"); do
        if [ "$mode" = warm ]; then cat "$src"/*.safetensors > /dev/null; else drop; fi
        b=$(baseline)
        if [ "$mode" = warm ]; then cat "$src"/*.safetensors > /dev/null; else drop; fi
        read -r c kb < <(convert)
        [ "$kb" -gt "$rss" ] && rss=$kb
        ratio=$(echo "$c / $b" | bc -l)
        echo "$ratio" >> "$out/ratios.$mode"
        printf '%s round %d: read input + write output %.2f s, bitnet convert --to %s %.2f s (%.2fx)\n' \
            "$mode" "$r" "$b" "$to" "$c" "$ratio"
    done
    printf '%s: median ratio %.2fx, peak RSS %.0f MiB\n' "$mode" "$(median < "$out/ratios.$mode")" \
        "$(echo "$rss/1024" | bc -l)"
done
[ "$can_drop" = 1 ] || echo "(not root: the cold-cache rounds were skipped)"
