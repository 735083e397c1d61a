#!/usr/bin/env bash
# Commit the resumable state of a (staged) retrain, so the next session resumes it instead of starting over:
# every run's state.json / state.safetensors / best.safetensors (and dev-progress.json: an interrupted dev
# evaluation's ranks so far), the staged checkpoints and the results files.
# runs/ and the staged artifacts are git-ignored, so they are force-added; nothing else is staged or committed
# (the prefix cache and logs stay out; other staged changes are left staged). Safe to run while training runs: every file is written atomically.
#   scripts/commit_states.sh                       # runs/wave2, runs/wave2/artifacts, results/wave2
#   RUNS=runs/wave3 RESULTS=results/wave3 scripts/commit_states.sh "message"
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/wave2}
RESULTS=${RESULTS:-results/wave2}
ARTIFACTS=${ARTIFACTS:-$RUNS/artifacts}
shopt -s nullglob
paths=()
removed=()
for dir in "$RUNS"/*/; do
  for f in state.json state.safetensors best.safetensors dev-progress.json; do
    if [ -e "$dir$f" ]; then
      paths+=("$dir$f")
    elif git ls-files --error-unmatch -- "$dir$f" >/dev/null 2>&1; then
      git rm -q --cached -- "$dir$f"  # a dev evaluation's progress, removed when it completed
      removed+=("$dir$f")
    fi
  done
done
[ -d "$ARTIFACTS" ] && paths+=("$ARTIFACTS")
[ ${#paths[@]} -gt 0 ] && git add -f -- "${paths[@]}"
results=("$RESULTS"/*.json "$RESULTS"/*.png "$RESULTS"/zero_shot/*.json)
[ ${#results[@]} -gt 0 ] && git add -- "${results[@]}"
staged=("${paths[@]}" "${results[@]}" "${removed[@]}")
if [ ${#staged[@]} -eq 0 ] || git diff --cached --quiet -- "${staged[@]}"; then
  echo "commit_states: nothing changed"
  exit 0
fi
summary=()
for state in $(git diff --cached --name-only -- "$RUNS" | grep '/state.json$' || true); do
  summary+=("$(python3 - "$state" <<'PY'
import json, sys
from pathlib import Path
s = json.loads(Path(sys.argv[1]).read_text())
c = s["curve"][-1] if s["curve"] else None
print(f"{Path(sys.argv[1]).parent.name} step {s['step']}" + (" (finished)" if s.get("finished") else "")
      + (f", validation {c['hit@1']} / {c['mrr@10']} at {c['step']}" if c else ""))
PY
)")
done
msg=${1:-"Retrain states: $(IFS=';'; echo "${summary[*]:-results only}" | sed 's/;/; /g')"}
git commit -q -m "$msg" -- "${staged[@]}"  # only these paths, whatever else is staged
git log --oneline -1
