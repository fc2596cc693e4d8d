#!/usr/bin/env bash
# One night of a nightly render: tonight's dated output folder, reusing what earlier nights rendered.
#
#   nightly.sh [--dry-run] [--night YYYY-MM-DD] [--spec SPEC.yaml] RENDERS MANIFEST [run options ...]
#
# With --spec, tonight's manifest is built first from the spec (a product feed read tonight):
#
#   freecustom-pipeline manifest build SPEC.yaml -o MANIFEST
#
# (row ids stay put from night to night, so unchanged products are reused below); a build that fails
# stops the night with the build's exit code, before anything is rendered. Then it runs
#
#   freecustom-pipeline run MANIFEST -o RENDERS/NIGHT [--reuse RENDERS/EARLIER ...] [run options ...]
#
# NIGHT is today's UTC date (`date -u +%F`) unless --night names one. The earlier nights are the
# folders RENDERS/YYYY-MM-DD before NIGHT, newest first, as `freecustom-pipeline inspect --json`
# reads them:
#   - finished (its run reached the end and wrote _stats.json, failed rows or not): reused; the
#     chain stops there, since that night holds every sample of its manifest that rendered;
#   - unfinished (_run.json but no _stats.json: killed, deadline, broke off): its finished shards
#     are reused and the next older night is looked at too;
#   - no output folder at all (the night stopped before it started: an unreadable manifest), or one
#     `inspect` cannot read: skipped.
# So the first night renders everything, and a failed night never breaks the chain. Tonight's own
# folder is never a --reuse: a retry of the same night runs the same command on it and resumes.
# Every night is self-contained (reused samples are copied), so pruning old nights is always safe.
#
# The night's other settings are best kept in a config file, `--config cluster/nightly.yaml` among
# the run options (leave -o and --reuse out of it: nightly.sh sets them).
# --dry-run prints the run command (one line, shell-quoted) instead of running it, and the build
# command, if any, on stderr ("nightly: would build: ..."). What was chosen and why goes to stderr.
# RENDERS is a local folder every node mounts (the shared volume).
set -euo pipefail

CLI=freecustom-pipeline
DATE_RE='^[0-9]{4}-[0-9]{2}-[0-9]{2}$'

usage() {
    echo "usage: nightly.sh [--dry-run] [--night YYYY-MM-DD] [--spec SPEC.yaml] RENDERS MANIFEST [run options ...]" >&2
    echo "nightly.sh: $1" >&2
    exit 2
}

dry_run=0
night=""
spec=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --night)
            [[ $# -ge 2 ]] || usage "--night needs a date (YYYY-MM-DD)"
            night="$2"; shift 2 ;;
        --night=*) night="${1#--night=}"; shift ;;
        --spec)
            [[ $# -ge 2 ]] || usage "--spec needs a build spec (SPEC.yaml)"
            spec="$2"; shift 2 ;;
        --spec=*) spec="${1#--spec=}"; shift ;;
        -h|--help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) break ;;
    esac
done
[[ $# -ge 2 ]] || usage "RENDERS and MANIFEST are required"
renders="${1%/}"
manifest="$2"
shift 2
night="${night:-$(date -u +%F)}"
[[ "$night" =~ $DATE_RE ]] || usage "--night '$night': expected a date such as 2026-06-01"
[[ "$renders" != *://* ]] || usage "RENDERS '$renders': a local folder that every node mounts, not a URI"
for option in "$@"; do
    case "$option" in
        -o|--out|--out=*|-o?*) usage "'$option': the output folder is RENDERS/$night, set by nightly.sh" ;;
    esac
done

# Earlier nights, newest first: finished ones end the chain, unfinished ones join it.
reuse=()
if [[ -d "$renders" ]]; then
    while IFS= read -r name; do
        [[ "$name" =~ $DATE_RE && "$name" < "$night" && -d "$renders/$name" ]] || continue
        folder="$renders/$name"
        set +e
        report="$("$CLI" inspect "$folder" --json -q 2>/dev/null)"
        status=$?
        set -e
        if [[ $status -eq 2 ]]; then
            echo "nightly: $folder: no output folder (that night stopped before it started): skipped" >&2
            continue
        elif [[ $status -ne 0 ]]; then  # e.g. a damaged _run.json: what it holds cannot be trusted
            echo "nightly: $folder: unreadable ($CLI inspect exits $status): skipped" >&2
            continue
        fi
        finished="$(printf '%s' "$report" | python3 -c \
            'import json, sys; print("yes" if json.load(sys.stdin).get("stats") else "no")')"
        reuse+=(--reuse "$folder")
        if [[ "$finished" == yes ]]; then
            echo "nightly: $folder: finished: reused; older nights are not needed" >&2
            break
        fi
        echo "nightly: $folder: unfinished (no _stats.json): its finished shards are reused" >&2
    done < <(ls -1 "$renders" | sort -r)
fi
[[ ${#reuse[@]} -gt 0 ]] || echo "nightly: no earlier night in $renders: everything renders" >&2

command=("$CLI" run "$manifest" -o "$renders/$night" "${reuse[@]}" "$@")
build=()
[[ -z "$spec" ]] || build=("$CLI" manifest build "$spec" -o "$manifest")
if [[ $dry_run -eq 1 ]]; then
    if [[ ${#build[@]} -gt 0 ]]; then
        printf 'nightly: would build: %s\n' "$(printf '%q ' "${build[@]}" | sed 's/ $//')" >&2
    fi
    printf '%q ' "${command[@]}" | sed 's/ $//'
    echo
    exit 0
fi
if [[ ${#build[@]} -gt 0 ]]; then
    echo "nightly: ${build[*]}" >&2
    "${build[@]}" || exit $?
fi
echo "nightly: ${command[*]}" >&2
exec "${command[@]}"
