#!/usr/bin/env bash
# The soak run: hotswap serving 64 keep-alive clients, a throttled download and a plugin swap
# every 100 ms, for 60 s. It passes only with zero failed requests, every download
# byte-exact, RSS at the end within 10 MiB of after the warm-up, exactly one plugin library
# mapped and no file descriptor leaked. Loopback only; every wait is bounded. Prints a summary
# and exits non-zero naming each check that failed.
#
#   bench/soak.sh                builds in release mode, soaks for 60 s
#   bench/soak.sh --seconds N    soaks for N s
#
# Options (mostly for the test suite):
#   --work DIR                   scratch directory (default target/soak)
#   --no-build                   use the release binaries already in the target directory
#   --bin-dir DIR                use the binaries in DIR (such as target/debug) instead;
#                                implies --no-build
#   --plugins A.so B.so          two example-handler builds instead of building them; with
#   --versions VA VB             the versions they answer with
# Other options of `hotswap-bench soak` (--clients, --swap-every-ms, --download-size, ...)
# are passed through. Environment: CARGO_TARGET_DIR.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
source "$root/bench/lib.sh"
target=${CARGO_TARGET_DIR:-$root/target}
work=$target/soak
bins= build=1 seconds=60 plugins=() versions=() extra=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --seconds) seconds=$2; shift ;;
        --work) work=$2; shift ;;
        --no-build) build=0 ;;
        --bin-dir) bins=$2 build=0; shift ;;
        --plugins) plugins=("$2" "$3"); shift 2 ;;
        --versions) versions=("$2" "$3"); shift 2 ;;
        -h | --help) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --*=*) extra+=("$1") ;;
        --*) [[ $# -ge 2 ]] || { echo "$1 needs a value (see bench/soak.sh --help)" >&2; exit 2; }
             extra+=("$1" "$2"); shift ;;
        *) echo "unknown argument $1 (see bench/soak.sh --help)" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$work"
bins=${bins:-$target/release}

if [[ $build -eq 1 ]]; then
    echo "== building (release)" >&2
    cargo build --release -p hotswap -p hotswap-bench >&2
fi
if [[ ${#plugins[@]} -eq 0 ]]; then
    # Two builds of the example handler that answer with different versions, to swap between.
    build_example_versions "$target" "$work/builds" 1.0.0+soak-a 1.0.0+soak-b
    plugins=("$work/builds/1.0.0+soak-a.so" "$work/builds/1.0.0+soak-b.so") versions=(1.0.0+soak-a 1.0.0+soak-b)
fi

exec "$bins/hotswap-bench" soak --hotswap "$bins/hotswap" \
    --plugins "${plugins[@]}" --versions "${versions[@]}" \
    --seconds "$seconds" --work "$work/run" "${extra[@]}"
