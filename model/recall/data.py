"""Mixed-domain sequences (ABXI's afk/abe splits): loading, leave-one-out, same-day steps, TAPE indices, batches.

One user = one time-ordered sequence mixing two domains (day resolution). Leave-one-out as ABXI: the last item is
the test target, the second-to-last the validation target, everything before is training.

Same-day ties. Within a day the file order is an artifact (food before kitchen, then ascending id), so nothing
positional may depend on it:
- `step`: the day index (0, 1, ...): same-day items share one step;
- `dom_step`: per item, the number of *earlier days* on which the item's own domain appeared (within-domain day
  position);
- `trans`: the transition into the item's day: (domains of the previous day, item's domain), where "domains of the
  previous day" is one domain, or MIXED when both appeared that day, or START for the first day. Two same-day items
  of one domain get the same transition whatever the file order (reconstruction; the TAPE paper gives no formula).
Attention is causal by file index (the history of a target is what precedes it in the file, as in ABXI's
leave-one-out), so a same-day item before the target is visible; the order-dependent parts above are not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = {"food-kitchen": "amazon-food-kitchen", "beauty-electronics": "amazon-beauty-electronics"}
DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
START, MIXED = 2, 3  # previous-day codes beyond the two domain ids 0 and 1
N_PREV = 4  # domain 0, domain 1, START, MIXED
N_TRANS = N_PREV * 2


def check_dataset(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return name


def dataset_dir(name: str, root: Path | None = None) -> Path:
    path = (root or DEFAULT_DATA) / DATASETS[check_dataset(name)]
    if not (path / "sequences.jsonl").is_file():
        raise FileNotFoundError(f"{path}/sequences.jsonl not found; pass --data-root pointing at the folder that "
                                f"holds {DATASETS[name]}/")
    return path


@dataclass
class Catalog:
    """Items of one dataset: ids are 1..n_items (0 = padding); each domain is one contiguous id range."""

    domains: list[str]  # domain names, index = domain id (0, 1)
    item_domain: np.ndarray  # (n_items + 1,) domain id per item id; -1 for the padding id 0
    titles: list[str | None]  # index = item id

    @property
    def n_items(self) -> int:
        return len(self.item_domain) - 1

    def domain_items(self, d: int) -> np.ndarray:
        """Item ids of domain d, ascending."""
        return np.flatnonzero(self.item_domain == d)

    def domain_id(self, name: str) -> int:
        if name not in self.domains:
            raise ValueError(f"unknown domain {name!r}; known: {', '.join(self.domains)}")
        return self.domains.index(name)


@dataclass
class Sequence:
    user: str
    items: np.ndarray  # (n,) item ids
    doms: np.ndarray  # (n,) domain ids
    ts: np.ndarray  # (n,) unix seconds (day resolution)


def load_catalog(path: Path) -> Catalog:
    rows = [json.loads(line) for line in (path / "items.jsonl").open()]
    domains: list[str] = []
    for r in rows:
        if r["domain"] not in domains:
            domains.append(r["domain"])
    if len(domains) != 2:
        raise ValueError(f"{path}/items.jsonl has domains {domains}; the recall model expects exactly two")
    n = max(r["id"] for r in rows)
    item_domain = np.full(n + 1, -1, dtype=np.int64)
    titles: list[str | None] = [None] * (n + 1)
    for r in rows:
        item_domain[r["id"]] = domains.index(r["domain"])
        titles[r["id"]] = r["title"]
    return Catalog(domains, item_domain, titles)


def load_sequences(path: Path, catalog: Catalog, limit: int | None = None) -> list[Sequence]:
    out = []
    with (path / "sequences.jsonl").open() as f:
        for line in f:
            r = json.loads(line)
            items = np.asarray(r["items"], dtype=np.int64)
            out.append(Sequence(r["user"], items, catalog.item_domain[items], np.asarray(r["ts"], dtype=np.int64)))
            if limit is not None and len(out) >= limit:
                break
    return out


def tape_indices(doms: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(step, dom_step, trans) per item; equal `ts` = one step, independent of the order within a day."""
    n = len(doms)
    step, dom_step, trans = (np.zeros(n, dtype=np.int64) for _ in range(3))
    day, days_seen = -1, [0, 0]  # days_seen[d]: earlier days on which domain d appeared
    prev_code, cur_doms, prev_doms = START, set(), set()
    for i in range(n):
        if i == 0 or ts[i] != ts[i - 1]:
            if i > 0:
                prev_doms = cur_doms
                for d in prev_doms:
                    days_seen[d] += 1
                prev_code = MIXED if len(prev_doms) > 1 else next(iter(prev_doms))
            day, cur_doms = day + 1, set()
        d = int(doms[i])
        cur_doms.add(d)
        step[i], dom_step[i], trans[i] = day, days_seen[d], prev_code * 2 + d
    return step, dom_step, trans


def query_transition(doms: np.ndarray, ts: np.ndarray, target_dom: int) -> int:
    """Transition code into a target after the history: (domains of the history's last day, target domain)."""
    if len(doms) == 0:
        return START * 2 + target_dom
    last = {int(d) for d, t in zip(doms, ts, strict=True) if t == ts[-1]}
    return (MIXED if len(last) > 1 else next(iter(last))) * 2 + target_dom


def _query_transitions(doms: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """`query_transition(doms[:j], ts[:j], doms[j])` for j = 1..n-1, in one pass."""
    out = np.zeros(len(doms) - 1, dtype=np.int64)
    day_doms: set[int] = set()
    for j in range(1, len(doms)):
        if j == 1 or ts[j - 1] != ts[j - 2]:
            day_doms = set()
        day_doms.add(int(doms[j - 1]))
        out[j - 1] = (MIXED if len(day_doms) > 1 else next(iter(day_doms))) * 2 + int(doms[j])
    return out


@dataclass
class Batch:
    """Left-aligned, right-padded inputs; every tensor is (B, T) unless noted."""

    items: torch.Tensor  # item ids, 0 = padding
    doms: torch.Tensor  # domain ids (0 for padding; masked by `valid`)
    ts: torch.Tensor  # day stamps (-1 for padding)
    step: torch.Tensor
    dom_step: torch.Tensor
    trans: torch.Tensor
    valid: torch.Tensor  # bool
    targets: torch.Tensor  # next item id per position, 0 = no target
    target_doms: torch.Tensor  # the next item's domain
    query_trans: torch.Tensor  # transition into the next item (from the day of the current position)


def make_batch(seqs: list[Sequence], max_len: int, cut: int, only_last: bool = False) -> Batch:
    """Inputs = the first n-cut items of each sequence (last `max_len`), targets = the item after each position.

    cut=2: training (targets up to the third-to-last item); cut=1 with only_last: validation target; cut=0 with
    only_last: test target. With only_last, only the last input position carries a target.
    """
    rows = []
    for s in seqs:
        n = len(s.items) - cut  # items available: inputs + the final target
        items, doms, ts = s.items[:n], s.doms[:n], s.ts[:n]
        step, dom_step, trans = tape_indices(doms, ts)
        inp = slice(max(0, n - 1 - max_len), n - 1)
        tgt = slice(inp.start + 1, n)
        qtrans = _query_transitions(doms[inp.start:n], ts[inp.start:n])
        step_in = step[inp] - step[inp][0]  # relative to the first kept day
        rows.append((items[inp], doms[inp], ts[inp], step_in, dom_step[inp], trans[inp], items[tgt], doms[tgt],
                     qtrans))
    T = max(len(r[0]) for r in rows)
    B = len(rows)
    arr = {k: np.zeros((B, T), dtype=np.int64) for k in
           ("items", "doms", "step", "dom_step", "trans", "targets", "target_doms", "query_trans")}
    arr["ts"] = np.full((B, T), -1, dtype=np.int64)
    valid = np.zeros((B, T), dtype=bool)
    for b, (it, dm, t, st, ds, tr, tg, td, qt) in enumerate(rows):
        L = len(it)
        arr["items"][b, :L], arr["doms"][b, :L], arr["ts"][b, :L] = it, dm, t
        arr["step"][b, :L], arr["dom_step"][b, :L], arr["trans"][b, :L] = st, ds, tr
        valid[b, :L] = True
        if only_last:
            arr["targets"][b, L - 1], arr["target_doms"][b, L - 1] = tg[-1], td[-1]
            arr["query_trans"][b, L - 1] = qt[-1]
        else:
            arr["targets"][b, :L], arr["target_doms"][b, :L], arr["query_trans"][b, :L] = tg, td, qt
    t = {k: torch.from_numpy(v) for k, v in arr.items()}
    return Batch(valid=torch.from_numpy(valid), **t)


def select(batch: Batch, rows: torch.Tensor | slice) -> Batch:
    """Rows of a batch, trimmed to their longest sequence."""
    valid = batch.valid[rows]
    T = int(valid.sum(1).max())
    return Batch(**{k: getattr(batch, k)[rows][:, :T] for k in batch.__dataclass_fields__})
