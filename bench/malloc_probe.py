"""One process's forward times of plain MiniLM at 30 and 60 prompts, with or without `tune_malloc` (glibc settings
are process-wide and stick once changed, so the comparison needs separate processes; bench.explore alternates
them).

    python -m bench.malloc_probe --tuned     # prints {"30": s, "60": s} (medians of --reps)
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.malloc_probe")
    p.add_argument("--tuned", action="store_true")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    if args.tuned:
        from service.machine import tune_malloc

        tune_malloc()
    from bench.explore import collate, rows_of
    from bench.models import dev_requests
    from bench.timing import interleave, median
    from model.backbone import load_backbone

    bb = load_backbone("minilm")
    rows = rows_of(dev_requests(bb, 3))
    b30, b60 = collate(rows[:30]), collate(rows[30:90])

    def fwd(batch):
        with torch.inference_mode():
            return bb.model(input_ids=batch[0], attention_mask=batch[1]).last_hidden_state

    times = interleave({"30": lambda i: fwd(b30), "60": lambda i: fwd(b60)}, reps=args.reps)
    print(json.dumps({k: median(v) for k, v in times.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
