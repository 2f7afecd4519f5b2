#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 60): scripts/fuzz.sh [SECONDS] [TARGET...]
# Installs cargo-fuzz when missing. Uses the stable toolchain with RUSTC_BOOTSTRAP=1 (cargo fuzz needs
# nightly-only sanitizer flags). Seeds in fuzz/seeds/<target>/ start each run; new corpus entries go to
# target/fuzz-corpus/<target>/ (not committed). A crash fails the run; its input is in fuzz/artifacts/ and
# should become a regression test. Prints executions per target and writes target/fuzz/summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"; shift || true
command -v cargo-fuzz >/dev/null 2>&1 || { echo "==> installing cargo-fuzz (once)"; cargo install -q cargo-fuzz; }
export RUSTC_BOOTSTRAP=1
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
mkdir -p target/fuzz
summary=target/fuzz/summary.md
printf '| target | seconds | executions | exec/s | result |\n|---|---:|---:|---:|---|\n' > "$summary"
status=0
for t in "${targets[@]}"; do
  corpus="target/fuzz-corpus/$t"; mkdir -p "$corpus"
  seeds=(); [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
  log="target/fuzz/$t.log"
  echo "==> fuzz $t for ${secs}s"
  if cargo fuzz run --fuzz-dir fuzz "$t" "$corpus" "${seeds[@]}" -- -max_total_time="$secs" -rss_limit_mb=2048 \
       -max_len=65536 -print_final_stats=1 > "$log" 2>&1; then result=ok; else result=CRASH; status=1; tail -40 "$log"; fi
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  printf '| %s | %s | %s | %s | %s |\n' "$t" "$secs" "${execs:-?}" "${rate:-?}" "$result" | tee -a "$summary"
done
exit $status
