#!/usr/bin/env bash
# The hotswap benchmark suite: hotswap against a static hyper server with the same handler
# compiled in, and against the Node cluster anchor (../shared/anchors/node-cluster), in one run.
# Writes the results into BENCHMARKS.md (between its result markers). Loopback only; every
# section is bounded; a full run takes about 14 minutes, of which the anchor's own reload
# benchmark is about 3.
#
#   bench/run.sh                 full run: builds in release mode, installs wrk if missing
#                                (apt-get) and the anchor's PM2 (npm ci), runs everything,
#                                rewrites BENCHMARKS.md
#   bench/run.sh --smoke         seconds per section: checks that the suite works. Installs
#                                nothing: without wrk it stops at once and says so
#
# Options (mostly for the test suite's smoke run):
#   --no-install                 install nothing, as --smoke does (wrk missing: stop)
#   --out FILE                   write FILE instead of BENCHMARKS.md
#   --work DIR                   scratch directory (default target/bench)
#   --no-build                   use the release binaries already in the target directory
#   --bin-dir DIR                use the binaries in DIR (such as target/debug) instead;
#                                implies --no-build
#   --plugins A.so B.so          two example-handler builds instead of building them; with
#   --versions VA VB             the versions they answer with
#   --axum-plugin A.so           the axum example's build for section i (default: the one in
#                                the target directory)
#   --no-anchor-reloads          skip the anchor's own reload benchmark (3 minutes)
# Environment: HOTSWAP_ANCHOR (default ../shared/anchors/node-cluster), CARGO_TARGET_DIR.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
source "$root/bench/lib.sh"
target=${CARGO_TARGET_DIR:-$root/target}
out=$root/BENCHMARKS.md
work=$target/bench
smoke=() bins= build=1 install=1 anchor_reloads=(--anchor-reloads) plugins=() versions=() axum_plugin= entry="bench/run.sh${*:+ $*}"
while [[ $# -gt 0 ]]; do
    case $1 in
        --smoke) smoke=(--smoke) anchor_reloads=() install=0 ;;
        --no-install) install=0 ;;
        --out) out=$2; shift ;;
        --work) work=$2; shift ;;
        --no-build) build=0 ;;
        --bin-dir) bins=$2 build=0; shift ;;
        --plugins) plugins=("$2" "$3"); shift 2 ;;
        --versions) versions=("$2" "$3"); shift 2 ;;
        --axum-plugin) axum_plugin=$2; shift ;;
        --no-anchor-reloads) anchor_reloads=() ;;
        -h | --help) sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1 (see bench/run.sh --help)" >&2; exit 2 ;;
    esac
    shift
done

# Only a full run installs anything. The smoke run (which the tests start) and --no-install
# stop here instead, before any build, if wrk is missing.
if ! command -v wrk >/dev/null; then
    if [[ $install -eq 0 ]]; then
        echo "bench/run.sh: wrk is not installed, and this run installs nothing (--smoke or --no-install)." >&2
        echo "Install it with 'apt-get install wrk' (or run .ci/run, which does), or run bench/run.sh without --smoke." >&2
        exit 3
    fi
    echo "== installing wrk (Debian package)" >&2
    sudo=(); [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq >&2 && "${sudo[@]}" apt-get install -y -qq wrk >&2 || true
    command -v wrk >/dev/null || { echo "bench/run.sh: installing wrk failed: install it with 'apt-get install wrk'" >&2; exit 3; }
fi
mkdir -p "$work"
bins=${bins:-$target/release}

if [[ $build -eq 1 ]]; then
    echo "== building (release)" >&2
    cargo build --release -p hotswap -p static-server -p hotswap-bench -p example-axum >&2
fi
if [[ ${#plugins[@]} -eq 0 ]]; then
    # Two builds of the example handler that answer with different versions, to swap between.
    build_example_versions "$target" "$work/builds" 1.0.0+bench-a 1.0.0+bench-b
    plugins=("$work/builds/1.0.0+bench-a.so" "$work/builds/1.0.0+bench-b.so") versions=(1.0.0+bench-a 1.0.0+bench-b)
fi

# A private copy of the anchor: its scripts write version.txt and results/ next to themselves.
anchor=()
anchor_src=${HOTSWAP_ANCHOR:-$root/../shared/anchors/node-cluster}
if [[ -f $anchor_src/server.js ]] && command -v node >/dev/null; then
    mkdir -p "$work/anchor"
    (cd "$anchor_src" && tar --exclude=node_modules --exclude=results --exclude=.pm2 -cf - .) | (cd "$work/anchor" && tar -xf -)
    if [[ $install -eq 1 && ${#anchor_reloads[@]} -gt 0 && ! -x $work/anchor/node_modules/.bin/pm2 ]]; then
        echo "== installing the anchor's PM2 (npm ci)" >&2
        (cd "$work/anchor" && npm ci --no-audit --no-fund >&2) || echo "== npm ci failed" >&2
    fi
    if [[ ${#anchor_reloads[@]} -gt 0 && ! -x $work/anchor/node_modules/.bin/pm2 ]]; then
        # The anchor's reload benchmark needs PM2 (its bench.sh stops without it).
        echo "== PM2 is not installed: the anchor's reload benchmark is left out" >&2
        anchor_reloads=()
    fi
    anchor=(--anchor "$work/anchor")
else
    echo "== no Node.js or no anchor at $anchor_src: the anchor is left out" >&2
fi

# Section i: the axum example, as a plugin and compiled into static-axum.
axum=() axum_plugin=${axum_plugin:-$bins/libexample_axum.so}
if [[ -f $axum_plugin && -x $bins/static-axum ]]; then
    axum=(--axum-plugin "$axum_plugin" --static-axum "$bins/static-axum")
else
    echo "== the axum example or static-axum is not built: section i is left out" >&2
fi

exec "$bins/hotswap-bench" "${smoke[@]}" "${anchor_reloads[@]}" "${anchor[@]}" \
    --hotswap "$bins/hotswap" --static-server "$bins/static-server" \
    --plugins "${plugins[@]}" --versions "${versions[@]}" "${axum[@]}" \
    --work "$work/run" --out "$out" --entry "$entry"
