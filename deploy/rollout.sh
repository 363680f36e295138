#!/usr/bin/env bash
# Rolls a plugin version across the pods of a hotswap Deployment, through each pod's admin API
# (`kubectl exec POD -c hotswap -- hotswap …`): one pod runs it as a canary first, judged by
# the hosts' own rules (their [canary] settings), then each other pod in turn. A canary rolled
# back stops the rollout, and the pods already moved go back to the version they served.
#
#   deploy/rollout.sh VERSION [options]
#
# Options:
#   -n, --namespace NS     the Deployment's namespace (default: kubectl's)
#   -l, --selector SEL     its pods (default: app.kubernetes.io/name=hotswap)
#   --configmap NAME       where the released version is kept (default: hotswap; "" for none)
#   --percent P            the first pod's canary share (default: 10)
#   --rest-percent P       the share on each other pod (default: 50)
#   --timeout SECONDS      how long one pod's canary may run (default: 1200)
#   --wait-build SECONDS   how long to wait for every pod's sidecar to have the build
#                          (default: 300)
#   --poll SECONDS         how often to ask the hosts how their canary does (default: 5)
#
# The hosts run with `hold = true` (deploy/kubernetes/configmap.yaml): the build the sidecar
# pulled does not serve before its turn. Once every pod serves VERSION, it is written to the
# ConfigMap's `released` key, which a host that restarts starts pinned to (HOTSWAP_PIN).
# VERSION is the plugin's declared version (build metadata aside), which is also the tag of
# its artifact.
#
# Needs bash 4.2 or later, kubectl and jq. Exits 0 when every ready pod serves VERSION; 1
# when a canary was rolled back or its host restarted (the reason is printed; the pods already
# moved, and the one that ran the canary, are put back); 2 on a usage error; 3 when a step did
# not happen in time, or a kubectl call failed; 4 when the Deployment cannot be rolled now
# (no ready pod, or a canary already running).
set -euo pipefail

# The comment above, as the help.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2; }
say() { echo "rollout: $*" >&2; }

((BASH_VERSINFO[0] > 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] >= 2))) || { say "bash 4.2 or later is needed"; exit 2; }
version="" namespace="" selector="app.kubernetes.io/name=hotswap" configmap=hotswap
percent=10 rest_percent=50 timeout=1200 wait_build=300 poll=5
need() { [[ $# -ge 2 && -n $2 ]] || { say "$1 needs a value"; exit 2; }; }
while (($#)); do
    case $1 in
        -n|--namespace) need "$@"; namespace=$2; shift 2 ;;
        -l|--selector) need "$@"; selector=$2; shift 2 ;;
        --configmap) [[ $# -ge 2 ]] || need "$@"; configmap=$2; shift 2 ;;
        --percent) need "$@"; percent=$2; shift 2 ;;
        --rest-percent) need "$@"; rest_percent=$2; shift 2 ;;
        --timeout) need "$@"; timeout=$2; shift 2 ;;
        --wait-build) need "$@"; wait_build=$2; shift 2 ;;
        --poll) need "$@"; poll=$2; shift 2 ;;
        -h|--help) usage ;;
        -*) say "unknown option $1"; usage ;;
        *) [[ -z $version ]] || usage; version=$1; shift ;;
    esac
done
[[ -n $version ]] || usage
for n in "$timeout" "$wait_build" "$poll"; do
    [[ $n =~ ^[0-9]+$ ]] || { say "\`$n\` is not a number of seconds"; exit 2; }
done
for p in "$percent" "$rest_percent"; do
    [[ $p =~ ^[0-9]+(\.[0-9]+)?$ ]] && awk -v p="$p" 'BEGIN { exit !(p > 0 && p <= 100) }' \
        || { say "\`$p\` is not a share between 0 (excluded) and 100 percent"; exit 2; }
done
for tool in kubectl jq; do
    command -v "$tool" >/dev/null || { say "$tool is required"; exit 2; }
done

# kubectl, in the namespace if one was given; a failure returns 3 (and, under `set -e`, ends
# the script with it, except where the caller tests the status: `undo` goes on).
k() {
    if [[ -n $namespace ]]; then kubectl --namespace "$namespace" "$@"; else kubectl "$@"; fi \
        || { say "kubectl $* failed"; return 3; }
}
# `hotswap ARGS` in a pod, through its admin API.
hs() { local pod=$1; shift; k exec "$pod" -c hotswap -- hotswap "$@"; }
status() { hs "$1" status --json; }
# jq with the version (build metadata aside, as the host compares) as $v.
jqv() { jq --arg v "${version%%+*}" "$@"; }
ours='((.version // "") | split("+")[0]) == $v'

# Running, ready pods that are not on their way out.
listed=$(k get pods -l "$selector" -o json)
read -r -a pods <<<"$(jq -r '.items[]
    | select(.metadata.deletionTimestamp == null and .status.phase == "Running")
    | select(any(.status.conditions[]?; .type == "Ready" and .status == "True"))
    | .metadata.name' <<<"$listed" | tr '\n' ' ')"
((${#pods[@]})) || { say "no ready pod matches $selector"; exit 4; }
say "${#pods[@]} pods: ${pods[*]}"

# What each pod serves now, and the build it must have.
declare -A before
for pod in "${pods[@]}"; do
    deadline=$((SECONDS + wait_build))
    until status "$pod" | jqv -e ".builds | any($ours)" >/dev/null; do
        ((SECONDS < deadline)) || { say "$pod has no build of $version after ${wait_build}s (is it pushed, and the sidecar pulling?)"; exit 3; }
        sleep "$poll"
    done
    doc=$(status "$pod")
    jq -e '.canary == null' <<<"$doc" >/dev/null || { say "$pod runs a canary already: end it first (hotswap canary --abort)"; exit 4; }
    before[$pod]=$(jq -r '.current.version' <<<"$doc")
    say "$pod serves ${before[$pod]}"
done

moved=()
running="" trying=""
# Puts every pod moved so far back on the version it served, and ends a canary under way; the
# pod that ran it too, if it does not serve what it did (its host restarted, and serves the
# newest build it has).
undo() {
    if [[ -n $running ]]; then
        hs "$running" canary --abort >/dev/null 2>&1 || true
    fi
    if [[ -n $trying ]]; then
        local now
        now=$(status "$trying" 2>/dev/null | jq -r '.current.version' 2>/dev/null) || now=""
        if [[ ${now%%+*} != "${before[$trying]%%+*}" ]]; then
            moved+=("$trying")
        fi
    fi
    for pod in ${moved[@]+"${moved[@]}"}; do
        say "$pod: back to ${before[$pod]}"
        hs "$pod" pin "${before[$pod]}" >/dev/null || say "$pod: cannot pin ${before[$pod]}; do it by hand"
    done
}
trap 'say "interrupted"; undo; exit 3' INT TERM

# Runs VERSION as a canary with share $2 on pod $1 until its host promotes it or rolls it
# back. Returns 0 when promoted, 1 when rolled back (or the host restarted), 2 on a timeout,
# 3 when kubectl failed. (`set -e` is off in here: the caller tests the status.)
canary() {
    local pod=$1 share=$2 doc pid uptime generation
    doc=$(status "$pod") || return 3
    # A restart shows as another pid, or (in a container, where the host may be PID 1 each
    # time) as an uptime that went back.
    pid=$(jq -r '.pid' <<<"$doc")
    uptime=$(jq -r '.uptime_seconds' <<<"$doc")
    # Set first: if the answer is lost (the exec's stream broke), a canary may yet run.
    running=$pod
    doc=$(hs "$pod" canary "$version" --percent "$share" --json) || { say "$pod: the canary did not start"; return 1; }
    generation=$(jq -r '.canary.generation' <<<"$doc")
    say "$pod: canary of $version at $share % (generation $generation)"
    local deadline=$((SECONDS + timeout))
    while :; do
        doc=$(status "$pod") || return 3
        if [[ $(jq -r '.pid' <<<"$doc") != "$pid" ]] || jq -e --argjson u "$uptime" '.uptime_seconds < $u' <<<"$doc" >/dev/null; then
            say "$pod: its host restarted (or was replaced) during the canary: not judged"
            running=""
            return 1
        fi
        if jq -e '.canary == null' <<<"$doc" >/dev/null; then
            running=""
            if [[ $(jq -r '.current.generation' <<<"$doc") == "$generation" ]]; then
                say "$pod: $version promoted"
                return 0
            fi
            say "$pod: $version rolled back: $(jqv -r "[.refusals[] | select($ours)][0].reason // \"it ended without a verdict\"" <<<"$doc")"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            say "$pod: the canary is still running after ${timeout}s ($(jq -r '.canary.verdict' <<<"$doc")): aborting it"
            return 2
        fi
        sleep "$poll"
    done
}

# The pods that do not serve VERSION yet, in order: the first runs the first canary.
todo=()
for pod in "${pods[@]}"; do
    [[ ${before[$pod]%%+*} == "${version%%+*}" ]] || todo+=("$pod")
done
share=$percent
for pod in ${todo[@]+"${todo[@]}"}; do
    rc=0
    trying=$pod
    canary "$pod" "$share" || rc=$?
    if ((rc != 0)); then
        undo
        exit $((rc == 1 ? 1 : 3))
    fi
    moved+=("$pod")
    trying=""
    share=$rest_percent
done
trap - INT TERM
if [[ -n $configmap ]]; then
    patch=$(jq -nc --arg v "$version" '{data: {released: $v}}')
    k patch configmap "$configmap" --type merge -p "$patch" >/dev/null
    say "released $version (ConfigMap $configmap): a host that restarts serves it"
fi
say "every ready pod serves $version"
