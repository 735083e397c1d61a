#!/usr/bin/env bash
# Fit a lent-GPU call's tree under the 64 MiB transfer limit for a staged retrain (docs/training.md, "On a lent GPU").
#
#   scripts/gpu_carry.sh slim [STAGE]    # before the device call (STAGE: runs/<STAGE>, results/<STAGE>; default wave2)
#   scripts/gpu_carry.sh size            # what would travel now: tracked + untracked-not-ignored + .gpu/
#   scripts/gpu_carry.sh restore         # right after the call: the index as it was
#
# The device copy holds the tracked files, the untracked files git does not ignore and the carried paths (.gpu/).
# `slim` keeps code, docs and configs, results/<STAGE>, runs/<STAGE>/artifacts and the states of the runs under
# runs/<STAGE> that are not finished; every other tracked file under artifacts/, results/ and runs/ leaves the index
# (git rm --cached: nothing is deleted from disk) and is listed in .git/info/exclude between markers, so the copy
# leaves it out. `restore` puts the index back (git reset on those paths) and drops the markers. Commit nothing
# between the two.
set -eu
cd "$(dirname "$0")/.."
MARK_BEGIN="# gpu_carry.sh slim: begin"
MARK_END="# gpu_carry.sh slim: end"
EXCLUDE=.git/info/exclude
mkdir -p .git/info && touch "$EXCLUDE"

size() {
  local tracked others gpu
  tracked=$(git ls-files -z | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
  others=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
  gpu=$(du -sb .gpu 2>/dev/null | cut -f1)
  local total=$(( ${tracked:-0} + ${others:-0} + ${gpu:-0} ))
  echo "travels: tracked $(( ${tracked:-0} / 1048576 )) MiB + untracked $(( ${others:-0} / 1048576 )) MiB + .gpu/ $(( ${gpu:-0} / 1048576 )) MiB = $(( total / 1048576 )) MiB (limit 64 MiB)"
  [ "$total" -le $(( 64 * 1048576 )) ]
}

case "${1:-}" in
  slim)
    STAGE=${2:-wave2}
    if grep -qx "$MARK_BEGIN" "$EXCLUDE"; then echo "already slim: run scripts/gpu_carry.sh restore first" >&2; exit 1; fi
    if ! git diff --cached --quiet; then echo "the index has staged changes: commit or unstage them first" >&2; exit 1; fi
    keep_state() {  # an unfinished run's state travels, so the GPU run resumes it
      local d; d=$(dirname "$1")
      [ -f "$d/state.json" ] && ! python3 -c "import json,sys; sys.exit(0 if json.load(open('$d/state.json')).get('finished') else 1)"
    }
    drop=()
    while IFS= read -r f; do
      case "$f" in
        "results/$STAGE"/*|"runs/$STAGE/artifacts"/*) continue ;;
        "runs/$STAGE"/*/state.json|"runs/$STAGE"/*/state.safetensors) keep_state "$f" && continue ;;
      esac
      drop+=("$f")
    done < <(git ls-files artifacts results runs)
    { echo "$MARK_BEGIN"; printf '/%s\n' "${drop[@]}"; echo "$MARK_END"; } >> "$EXCLUDE"
    printf '%s\0' "${drop[@]}" | xargs -0 -r git rm -q --cached --
    echo "left out of the device copy: ${#drop[@]} tracked files (scripts/gpu_carry.sh restore puts them back)"
    size
    ;;
  restore)
    git reset -q -- artifacts results runs
    python3 - "$EXCLUDE" "$MARK_BEGIN" "$MARK_END" <<'EOF'
import sys
path, begin, end = sys.argv[1:]
out, skip = [], False
for line in open(path).read().splitlines():
    if line == begin:
        skip = True
    elif line == end:
        skip = False
    elif not skip:
        out.append(line)
open(path, "w").write("\n".join(out) + ("\n" if out else ""))
EOF
    git diff --cached --quiet && echo "index restored" || { echo "index still differs from HEAD: check git status" >&2; exit 1; }
    ;;
  size)
    size
    ;;
  *)
    sed -n 2,13p "$0"; exit 2 ;;
esac
