#!/usr/bin/env bash
# What repeated loading costs per generation: for the example handler and for the fixture
# that uses thread_local!, tracing and std::thread::current() (tests/fixtures/tls), a fresh
# hotswap host is swapped 2000 times (a copy of the build renamed into its plugin directory,
# requests after each swap). At checkpoints it records RSS, mappings, plugin libraries still
# mapped, fds, threads and pthread keys in use. Prints a Markdown report; the analysis in
# BENCHMARKS.md ("Repeated loading") is written by hand from it. Loopback only; about a minute after the build.
#
#   bench/generations.sh                  builds (release) and measures
#
# Options:
#   --swaps N                renames per plugin (default 2000)
#   --checkpoints A,B,...    where to measure (default 10,100,500,1000,1500,2000)
#   --drain-timeout-ms MS    the host's --drain-timeout (default 1000); checkpoints wait for it
#   --work DIR               scratch directory (default target/bench/generations)
#   --out FILE               report file (default WORK/report.md)
#   --no-build               use the release binaries already in the target directory
# Environment: CARGO_TARGET_DIR.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
work=$target/bench/generations out='' build=1 extra=() entry="bench/generations.sh${*:+ $*}"
while [[ $# -gt 0 ]]; do
    case $1 in
        --swaps) extra+=(--swaps "$2"); shift ;;
        --checkpoints) extra+=(--checkpoints "$2"); shift ;;
        --drain-timeout-ms) extra+=(--drain-timeout-ms "$2"); shift ;;
        --work) work=$2; shift ;;
        --out) out=$2; shift ;;
        --no-build) build=0 ;;
        -h | --help) sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1 (see bench/generations.sh --help)" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$work"

if [[ $build -eq 1 ]]; then
    echo "== building (release)" >&2
    cargo build --release -p hotswap -p example-handler -p fixture-tls -p hotswap-bench >&2
fi

exec "$target/release/hotswap-bench" generations "${extra[@]}" \
    --hotswap "$target/release/hotswap" \
    --plugin "example-handler=$target/release/libexample_handler.so" \
    --plugin "fixture-tls=$target/release/libfixture_tls.so" \
    --work "$work/run" --out "${out:-$work/report.md}" --entry "$entry"
