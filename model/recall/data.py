"""Item-id sequences for the recall models: loading, splits, same-day steps, TAPE indices, batches.

Two kinds of dataset:
- mixed-domain (ABXI's afk/abe splits, `food-kitchen`, `beauty-electronics`): leave-one-out per user (below);
- one Amazon domain of amazon-xcross (`amazon-Tools`, `amazon-Toys`, `amazon-Sports`, `amazon-Electronics`;
  `load_amazon`): train users only for training, a seeded set of held-out train users for validation, dev users
  for test. Catalog ids are the file's 0-based ids + 1 (0 is padding); one domain (id 0).

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
AMAZON_DOMAINS = ("Tools", "Toys", "Sports", "Electronics")
AMAZON = {f"amazon-{d}": f"amazon-xcross/{d}" for d in AMAZON_DOMAINS}  # single-domain datasets
DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
VAL_FRACTION, MAX_VAL = 0.1, 1000  # held-out train users, as training.data.split_train_val (same users)
START, MIXED = 2, 3  # previous-day codes beyond the two domain ids 0 and 1
N_PREV = 4  # domain 0, domain 1, START, MIXED
N_TRANS = N_PREV * 2


def check_dataset(name: str) -> str:
    if name not in DATASETS and name not in AMAZON:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join([*DATASETS, *AMAZON])}")
    return name


def amazon_domain(dataset: str) -> str | None:
    """`Tools` for `amazon-Tools`; None for a mixed-domain dataset."""
    return dataset.removeprefix("amazon-") if dataset in AMAZON else None


def dataset_dir(name: str, root: Path | None = None) -> Path:
    rel = {**DATASETS, **AMAZON}[check_dataset(name)]
    path = (root or DEFAULT_DATA) / rel
    needed = "train.jsonl" if name in AMAZON else "sequences.jsonl"
    if not (path / needed).is_file():
        raise FileNotFoundError(f"{path}/{needed} not found; pass --data-root pointing at the folder that "
                                f"holds {rel}/")
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


@dataclass
class Splits:
    """What one dataset trains, validates and tests on; `*_cut`: items cut from the end of each sequence
    (`make_batch`): the training targets run up to the item before the cut, the evaluation target is the last item
    left."""

    catalog: Catalog
    train: list[Sequence]
    valid: list[Sequence]
    test: list[Sequence]
    train_cut: int
    valid_cut: int
    test_cut: int = 0


def leave_one_out(catalog: Catalog, seqs: list[Sequence]) -> Splits:
    """Mixed-domain protocol: every user in all three; last item test, second-to-last validation."""
    return Splits(catalog, seqs, seqs, seqs, train_cut=2, valid_cut=1)


def held_out_users(n: int, seed: int = 0, val_fraction: float = VAL_FRACTION, max_val: int | None = MAX_VAL
                   ) -> np.ndarray:
    """Sorted indices of the validation users among n train users (training.data.split_train_val's choice)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    if max_val is not None:
        n_val = min(n_val, max_val)
    return np.sort(order[:n_val])


def _amazon_sequences(path: Path, limit: int | None) -> list[Sequence]:
    """One file's users; ids shifted by +1 (0 = padding), one domain, every item its own day."""
    out = []
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            items = np.asarray(r["items"], dtype=np.int64) + 1
            out.append(Sequence(str(r["user"]), items, np.zeros(len(items), dtype=np.int64),
                                np.arange(len(items), dtype=np.int64)))
            if limit is not None and len(out) >= limit:
                break
    return out


def load_amazon(domain: str, root: Path | None = None, seed: int = 0, limit: int | None = None) -> Splits:
    """One amazon-xcross domain: train on the train users minus a seeded held-out set (every transition of their
    sequences, last item included), choose the epoch on the held-out users' last item, test on the dev users'
    last item (history = the rest). Dev users are never trained or validated on. `limit`: first N users of each
    file (smoke)."""
    path = dataset_dir(f"amazon-{domain}", root)
    titles: list[str | None] = [None]
    for line_no, line in enumerate((path / "items.jsonl").open()):
        r = json.loads(line)
        if r["id"] != line_no:
            raise ValueError(f"{path}/items.jsonl:{line_no + 1}: id {r['id']} is not the line index {line_no}")
        titles.append(r["title"])
    catalog = Catalog([domain], np.array([-1] + [0] * (len(titles) - 1), dtype=np.int64), titles)
    users = _amazon_sequences(path / "train.jsonl", limit)
    val = set(held_out_users(len(users), seed).tolist())
    return Splits(catalog, [u for i, u in enumerate(users) if i not in val], [users[i] for i in sorted(val)],
                  _amazon_sequences(path / "dev.jsonl", limit), train_cut=0, valid_cut=0)


def load_splits(dataset: str, root: Path | None = None, limit: int | None = None, seed: int = 0) -> Splits:
    """The splits of any dataset by name (`load_amazon` or leave-one-out over sequences.jsonl)."""
    domain = amazon_domain(check_dataset(dataset))
    if domain is not None:
        return load_amazon(domain, root, seed, limit)
    path = dataset_dir(dataset, root)
    catalog = load_catalog(path)
    return leave_one_out(catalog, load_sequences(path, catalog, limit))


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
