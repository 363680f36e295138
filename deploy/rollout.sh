#!/usr/bin/env bash
# Rolls a plugin version across the pods of a hotswap Deployment, through each pod's admin API
# (`kubectl exec POD -c hotswap -- hotswap …`): one pod runs it as a canary first, judged by
# the hosts' own rules (its [canary] settings), then each other pod in turn. A canary rolled
# back stops the rollout, and the pods already moved go back to the version they served.
#
#   deploy/rollout.sh VERSION [options]
#
# Options:
#   -n, --namespace NS     the Deployment's namespace (default: kubectl's)
#   -l, --selector SEL     its pods (default: app.kubernetes.io/name=hotswap)
#   --percent P            the first pod's canary share (default: 10)
#   --rest-percent P       the share on each other pod (default: 50)
#   --timeout DURATION     how long one pod's canary may run before the rollout gives up,
#                          in seconds (default: 1200)
#   --wait-build SECONDS   how long to wait for every pod's sidecar to have the build
#                          (default: 300)
#
# The hosts run with `hold = true` (deploy/kubernetes/configmap.yaml): the build the sidecar
# pulled does not serve before its turn.
#
# Needs kubectl and jq. Exits 0 when every pod serves VERSION, 1 when a canary was rolled
# back (the reason is printed; every pod serves what it served before), 2 on a usage error,
# and 3 when a step did not happen in time.
set -euo pipefail

# The comment above, as the help.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2; }

version="" namespace=() selector="app.kubernetes.io/name=hotswap"
percent=10 rest_percent=50 timeout=1200 wait_build=300
while (($#)); do
    case $1 in
        -n|--namespace) namespace=(--namespace "$2"); shift 2 ;;
        -l|--selector) selector=$2; shift 2 ;;
        --percent) percent=$2; shift 2 ;;
        --rest-percent) rest_percent=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --wait-build) wait_build=$2; shift 2 ;;
        -h|--help) usage ;;
        -*) echo "rollout: unknown option $1" >&2; usage ;;
        *) [[ -z $version ]] || usage; version=$1; shift ;;
    esac
done
[[ -n $version ]] || usage
for tool in kubectl jq; do
    command -v "$tool" >/dev/null || { echo "rollout: $tool is required" >&2; exit 2; }
done

say() { echo "rollout: $*" >&2; }
# `hotswap ARGS` in a pod, through its admin API.
hs() { local pod=$1; shift; kubectl "${namespace[@]}" exec "$pod" -c hotswap -- hotswap "$@"; }
status() { hs "$1" status --json; }

read -r -a pods <<<"$(kubectl "${namespace[@]}" get pods -l "$selector" \
    --field-selector=status.phase=Running -o jsonpath='{.items[*].metadata.name}')"
((${#pods[@]})) || { say "no running pod matches $selector"; exit 2; }
say "${#pods[@]} pods: ${pods[*]}"

# What each pod serves now, and the build it must have.
declare -A before
for pod in "${pods[@]}"; do
    deadline=$((SECONDS + wait_build))
    until status "$pod" | jq -e --arg v "$version" '.builds | any(.version == $v)' >/dev/null; do
        ((SECONDS < deadline)) || { say "$pod has no build of $version after ${wait_build}s (is it pushed, and the sidecar pulling?)"; exit 3; }
        sleep 5
    done
    doc=$(status "$pod")
    jq -e '.canary == null' <<<"$doc" >/dev/null || { say "$pod runs a canary already: end it first (hotswap canary --abort)"; exit 2; }
    before[$pod]=$(jq -r '.current.version' <<<"$doc")
    say "$pod serves ${before[$pod]}"
done

moved=()
# Puts every pod moved so far back on the version it served.
undo() {
    for pod in "${moved[@]}"; do
        say "$pod: back to ${before[$pod]}"
        hs "$pod" pin "${before[$pod]}" >/dev/null || say "$pod: cannot pin ${before[$pod]}; do it by hand"
    done
}

# Runs VERSION as a canary with share $2 on pod $1 until the host promotes it or rolls it
# back; returns 1 on a rollback (and prints why).
canary() {
    local pod=$1 share=$2
    if [[ ${before[$pod]} == "$version" ]]; then return 0; fi
    hs "$pod" canary "$version" --percent "$share" >/dev/null
    say "$pod: canary of $version at $share %"
    local deadline=$((SECONDS + timeout)) doc
    while :; do
        doc=$(status "$pod")
        if jq -e '.canary == null' <<<"$doc" >/dev/null; then
            if jq -e --arg v "$version" '.current.version == $v' <<<"$doc" >/dev/null; then
                say "$pod: $version promoted"
                return 0
            fi
            say "$pod: $version rolled back: $(jq -r '.refusals[0].reason // "no reason recorded"' <<<"$doc")"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            say "$pod: the canary is still running after ${timeout}s ($(jq -r '.canary.verdict' <<<"$doc")): aborting it"
            hs "$pod" canary --abort >/dev/null || true
            return 2
        fi
        sleep 5
    done
}

first=${pods[0]}
canary "$first" "$percent" || { rc=$?; undo; exit $((rc == 2 ? 3 : 1)); }
moved+=("$first")
for pod in "${pods[@]:1}"; do
    if canary "$pod" "$rest_percent"; then
        moved+=("$pod")
    else
        rc=$?
        undo
        exit $((rc == 2 ? 3 : 1))
    fi
done
say "every pod serves $version"
