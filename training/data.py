"""The amazon-xcross data (DESIGN 2): catalogs, users, popularity negatives, and a validation split of train users.

Files per domain under `<root>/<Domain>/`: `items.jsonl` (id = line index, HTML-escaped titles, a few null),
`train.jsonl` (`user`, chronological `items`; the last is the target) and `dev.jsonl` (+ 30 fixed `candidates`).
The root defaults to `../shared/data/amazon-xcross` beside the repository, or `$XCROSS_DATA_DIR`.

Validation split (used for source choice and early stopping, never dev): a seeded random `val_fraction` of the
train users (default 10%, seed 0) is held out; each held-out user gets 29 popularity negatives drawn once with
a seed derived from the split seed, so every model sees the same validation candidates.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from model.prompts import normalize_title

log = logging.getLogger(__name__)

DOMAINS = ("Tools", "Toys", "Sports", "Electronics")
N_CANDIDATES = 30
PLACEHOLDER_TITLE = "unknown item"


def default_data_root() -> Path:
    env = os.environ.get("XCROSS_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon-xcross"


def check_domain(name: str) -> str:
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; known: {', '.join(sorted(DOMAINS))}")
    return name


@dataclass(frozen=True)
class User:
    """One user's chronological item ids; the last one is the target. `candidates` only for evaluation users."""

    user: str
    items: tuple[int, ...]
    candidates: tuple[int, ...] | None = None

    @property
    def history(self) -> tuple[int, ...]:
        return self.items[:-1]

    @property
    def target(self) -> int:
        return self.items[-1]


@dataclass
class Catalog:
    """Item titles and asins of one domain, indexed by id."""

    domain: str
    titles: list[str]
    asins: list[str]
    null_titles: int = 0

    @cached_property
    def asin_to_id(self) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.asins)}

    def __len__(self) -> int:
        return len(self.titles)


def read_catalog(path: Path, domain: str = "") -> Catalog:
    titles, asins, nulls = [], [], 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            row = json.loads(line)
            if row["id"] != line_no - 1:
                raise ValueError(f"{path}:{line_no}: id {row['id']} is not the line index {line_no - 1}")
            nulls += not (row["title"] or "").strip()
            titles.append(normalize_title(row["title"], PLACEHOLDER_TITLE))
            asins.append(row["asin"])
    if nulls:
        log.warning("%s: %d null or empty titles replaced by %r", path, nulls, PLACEHOLDER_TITLE)
    return Catalog(domain or path.parent.name, titles, asins, nulls)


def read_users(path: str | Path, n_items: int) -> list[User]:
    """Users from a train.jsonl / dev.jsonl style file; unknown ids are an error naming file, line and id."""
    users = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            items, cands = tuple(row["items"]), row.get("candidates")
            for item in items + tuple(cands or ()):
                if not (isinstance(item, int) and 0 <= item < n_items):
                    raise ValueError(f"{path}:{line_no}: unknown item id {item!r} (catalog has ids 0..{n_items - 1})")
            if len(items) < 2:
                raise ValueError(f"{path}:{line_no}: user {row['user']!r} needs at least 2 items (history + target)")
            if cands is not None and items[-1] not in cands:
                raise ValueError(f"{path}:{line_no}: target {items[-1]} is not among the candidates")
            users.append(User(str(row["user"]), items, tuple(cands) if cands is not None else None))
    return users


@dataclass
class Domain:
    name: str
    catalog: Catalog
    train: list[User]
    dev: list[User]
    popularity: np.ndarray = field(repr=False)  # train interaction count per item


def load_domain(name: str, root: str | Path | None = None) -> Domain:
    d = Path(root or default_data_root()) / check_domain(name)
    if not d.is_dir():
        raise FileNotFoundError(f"no data for {name} at {d}; set XCROSS_DATA_DIR or --data-dir to amazon-xcross/")
    catalog = read_catalog(d / "items.jsonl", name)
    train = read_users(d / "train.jsonl", len(catalog))
    dev = read_users(d / "dev.jsonl", len(catalog))
    counts = np.zeros(len(catalog), dtype=np.int64)
    for u in train:
        np.add.at(counts, list(u.items), 1)
    return Domain(name, catalog, train, dev, counts)


class PopularitySampler:
    """Negatives with probability proportional to train count + 1, without replacement, excluding given ids.

    Sampling without replacement by weight uses the Gumbel top-k trick (equivalent to drawing one at a time,
    each proportional to weight among those not yet drawn).
    """

    def __init__(self, popularity: np.ndarray, seed: int | list[int] = 0):
        self.log_w = np.log(popularity.astype(np.float64) + 1.0)
        self.rng = np.random.default_rng(seed)

    def sample(self, exclude: set[int] | tuple[int, ...], k: int) -> list[int]:
        excl = np.fromiter(set(exclude), dtype=np.int64)
        if len(self.log_w) - len(excl) < k:
            raise ValueError(f"cannot draw {k} negatives: only {len(self.log_w) - len(excl)} items are not excluded")
        keys = self.log_w + self.rng.gumbel(size=len(self.log_w))
        keys[excl] = -np.inf
        top = np.argpartition(-keys, k - 1)[:k]
        return top[np.argsort(-keys[top])].tolist()

    def candidates(self, user: User, n: int = N_CANDIDATES) -> list[int]:
        """The target plus n-1 negatives (target first; shuffle before showing them to a model that could cheat)."""
        return [user.target, *self.sample(set(user.items), n - 1)]


def split_train_val(
    users: list[User], popularity: np.ndarray, val_fraction: float = 0.1, seed: int = 0, max_val: int | None = 1000
) -> tuple[list[User], list[User]]:
    """Seeded split of train users into (train, val); val users get fixed popularity candidates."""
    order = np.random.default_rng(seed).permutation(len(users))
    n_val = int(round(len(users) * val_fraction))
    if max_val is not None:
        n_val = min(n_val, max_val)
    val_idx = set(order[:n_val].tolist())
    train = [u for i, u in enumerate(users) if i not in val_idx]
    val = [users[i] for i in sorted(val_idx)]
    return train, with_candidates(val, popularity, seed)


def with_candidates(users: list[User], popularity: np.ndarray, seed: int = 0) -> list[User]:
    """Give users fixed shuffled candidate lists (target + 29 popularity negatives), seeded."""
    sampler = PopularitySampler(popularity, seed=seed + 1)
    out = []
    for u in users:
        cands = sampler.candidates(u)
        sampler.rng.shuffle(cands)
        out.append(User(u.user, u.items, tuple(cands)))
    return out
