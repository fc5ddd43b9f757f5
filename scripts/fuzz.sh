#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer, through libfuzzer-sys) of the decoders that read
# outside input: the binding's batch decoder, ingest's HTTP body parsers and the
# derived-event decoder (fuzz/fuzz_targets/).
#
#   bash scripts/fuzz.sh                    # every target, 20 s each (the test command's run)
#   FUZZ_SECONDS=3600 bash scripts/fuzz.sh  # a long run
#   bash scripts/fuzz.sh http_body          # one target
#
# It builds the targets on the stable toolchain with the coverage instrumentation cargo-fuzz
# uses (sancov), in fuzz/target, and runs each from its committed corpus (fuzz/corpus/NAME,
# read only: what the run finds goes to a scratch directory). A crash or a timeout fails
# the script and leaves the input in fuzz/artifacts/NAME/; reproduce it with
#   fuzz/target/x86_64-unknown-linux-gnu/release/NAME fuzz/artifacts/NAME/crash-...
# Add an input worth keeping to the corpus by hand. `cargo +nightly fuzz run NAME` (with
# cargo-fuzz installed) runs the same targets under AddressSanitizer.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/fuzz"

seconds=${FUZZ_SECONDS:-20}
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    targets=(batch_decode http_body derived_event)
fi

# libfuzzer-sys compiles libFuzzer (C++).
if ! command -v c++ >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ >&2
    else
        echo "fuzz.sh: needs a C++ compiler (Debian: apt-get install g++)" >&2
        exit 1
    fi
fi

locked=()
if [[ ${CI:-} == true ]]; then
    locked=(--locked)
fi
# What `cargo fuzz build --sanitizer none` passes, all stable flags.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps RUSTFLAGS off build scripts and proc macros (as cargo-fuzz does).
host=$(rustc -vV | sed -n 's/^host: //p')
cargo build "${locked[@]}" --release --bins --target "$host"
bin="target/$host/release"

status=0
for t in "${targets[@]}"; do
    scratch=$(mktemp -d)
    mkdir -p "artifacts/$t"
    echo "==> fuzz $t for ${seconds}s (corpus fuzz/corpus/$t)" >&2
    if ! "$bin/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 "$scratch" "corpus/$t" 2>"$scratch.log"; then
        tail -40 "$scratch.log" >&2
        echo "fuzz.sh: $t failed; the input is in fuzz/artifacts/$t/" >&2
        status=1
    else
        grep -E "stat::number_of_executed_units|stat::new_units_added" "$scratch.log" | sed "s/^/    $t: /" >&2 || true
    fi
    rm -rf "$scratch" "$scratch.log"
done
exit $status
