#!/usr/bin/env bash
# Runs every fuzz target for a bounded time and prints what it did:
#   fuzz/run.sh [SECONDS_PER_TARGET (60)] [TARGET...]
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# Corpora grow in fuzz/corpus/<target> (seeded from fuzz/seeds/<target>);
# findings land in fuzz/artifacts/<target> with the input that caused them,
# replayable with `cargo +nightly fuzz run <target> <file>`.
set -euo pipefail
cd "$(dirname "$0")"
# Its own target folder: instrumented builds do not mix with the tests' builds.
unset CARGO_TARGET_DIR
secs="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(dp_sql task_envelope secagg_messages node_batches)
fi
echo "building the fuzz targets (release, coverage-instrumented; the first build takes a while)..." >&2
cargo +nightly fuzz build --sanitizer none
mkdir -p logs
printf '%-18s %10s %9s %8s %9s %s\n' target seconds executions exec/s corpus findings
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    before=$(find "artifacts/$t" -type f | wc -l)
    dict=()
    if [ -f "$t.dict" ]; then dict=("-dict=$t.dict"); fi
    set +e
    cargo +nightly fuzz run --sanitizer none "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -timeout=20 -rss_limit_mb=4096 -max_len=8192 \
        -print_final_stats=1 "${dict[@]}" >"logs/$t.log" 2>&1
    set -e
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$' | tail -1)
    runs="${runs:-0}"
    corpus=$(find "corpus/$t" -type f | wc -l)
    after=$(find "artifacts/$t" -type f | wc -l)
    printf '%-18s %10s %9s %8s %9s %s\n' "$t" "$secs" "$runs" "$((runs / secs))" "$corpus" \
        "$((after - before)) new (logs/$t.log, artifacts/$t)"
done
