#!/usr/bin/env bash
# Coverage-guided fuzzing on the stable toolchain: builds node/fuzz with SanitizerCoverage
# (libFuzzer through libfuzzer-sys), seeds each target from our own fixture builder, runs each
# for FUZZ_SECONDS (default 60) with libFuzzer's memory limits at the node's bound, and appends
# one ledger line per campaign to node/fuzz/ledger.tsv (date, target, commit, seconds,
# executions, coverage, features, peak RSS, findings). A finding (crash, panic, out-of-memory,
# timeout) is copied to node/fuzz/regressions/<target>/, where `cargo test` replays it, and
# makes the script fail.
#
#   scripts/fuzz.sh                      # every target, 60 s each
#   FUZZ_REPORT_ONLY=1 scripts/fuzz.sh   # record findings without failing (scripts/test.sh)
#   FUZZ_SECONDS=600 scripts/fuzz.sh dicom_ingest pixel_decode
#   FUZZ_SANITIZER=address scripts/fuzz.sh pixel_decode   # with AddressSanitizer (the C and
#                                       # C++ codecs behind pixel decoding are where it matters)
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-60}
# One input may cost its size plus 64 MiB (the node's bound); libFuzzer's own corpus and the
# instrumented tables come on top, hence the process limit. A single allocation beyond
# 256 MiB is a finding by itself: that is how a trusted declared length shows.
rss_mb=${FUZZ_RSS_MB:-2048}
malloc_mb=${FUZZ_MALLOC_MB:-256}
work=target/fuzz
ledger=${FUZZ_LEDGER:-node/fuzz/ledger.tsv}
mkdir -p "$work"

if [ $# -gt 0 ]; then
  targets=("$@")
else
  targets=(dicom_ingest dimse_command pdu_stream pixel_decode nifti_input schema_text node_config sidecar wire_frame)
fi

host=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
build="$work/build"
label=""
if [ "${FUZZ_SANITIZER:-}" = address ]; then
  # AddressSanitizer is a nightly flag: RUSTC_BOOTSTRAP lets the stable compiler take it, in
  # a target directory of its own. Its shadow memory counts in the RSS: a higher limit.
  export RUSTC_BOOTSTRAP=1
  RUSTFLAGS="$RUSTFLAGS -Zsanitizer=address"
  build="$work/build-asan"
  label="+asan"
  rss_mb=${FUZZ_RSS_MB:-4096}
  export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=1}"
fi
# --target keeps build scripts and proc macros uninstrumented.
cargo build --release --locked --manifest-path node/fuzz/Cargo.toml --target "$host" \
  --target-dir "$build" --bins
unset RUSTFLAGS RUSTC_BOOTSTRAP
bin="$build/$host/release"

# Seeds from our fixture builder (no third-party file is committed).
rm -rf "$work/seeds"
cargo run --quiet --locked -p fc-fuzzing --example fuzz_seeds -- "$work/seeds"

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -f "$ledger" ] || printf 'date\ttarget\tcommit\tseconds\texecutions\tcoverage\tfeatures\tpeak_rss_mb\tfindings\n' > "$ledger"
failed=0
for t in "${targets[@]}"; do
  corpus="$work/corpus/$t"
  artifacts="$work/artifacts/$t/"
  rm -rf "$artifacts"
  mkdir -p "$corpus" "$artifacts"
  cp -n "$work/seeds/$t"/* "$corpus"/ 2>/dev/null || true
  cp -n "node/fuzz/regressions/$t"/* "$corpus"/ 2>/dev/null || true
  rm -f "$corpus/.gitkeep"
  log="$work/$t.log"
  set +e
  "$bin/$t" "$corpus" -dict=node/fuzz/dicom.dict -max_total_time="$seconds" \
    -rss_limit_mb="$rss_mb" -malloc_limit_mb="$malloc_mb" -timeout=10 \
    -print_final_stats=1 -artifact_prefix="$artifacts" > "$log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  peak=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  findings=$(find "$artifacts" -type f | wc -l)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$t$label" "$commit" "$seconds" \
    "${execs:-0}" "${cov:-0}" "${ft:-0}" "${peak:-0}" "$findings" >> "$ledger"
  echo "fuzz $t$label: ${execs:-0} executions in ${seconds}s, coverage ${cov:-0}, peak ${peak:-0} MB, findings $findings (exit $rc)"
  if [ "$findings" -gt 0 ] || [ "$rc" -ne 0 ]; then
    failed=1
    grep -E 'panicked|ERROR|SUMMARY' "$log" | head -5 >&2 || true
    if [ -z "${FUZZ_REPORT_ONLY:-}" ]; then
      mkdir -p "node/fuzz/regressions/$t"
      find "$artifacts" -type f -exec cp {} "node/fuzz/regressions/$t/" \;
    else
      echo "FUZZ FINDING ($t): kept in $artifacts; copy it to node/fuzz/regressions/$t/ and fix it" >&2
    fi
  fi
done
if [ -n "${FUZZ_REPORT_ONLY:-}" ]; then
  # The test run records the campaign (ledger, artifacts, the line above) without failing on a
  # new finding in a short campaign; committed findings fail `cargo test` until fixed.
  exit 0
fi
exit "$failed"
