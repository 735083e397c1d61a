"""Item catalogs of the served domains: `id` / `asin` / raw `title` -> the title that goes into the prompt.

Catalogs are read once at start with `training.data.read_catalog` (titles HTML-unescaped and normalised there).
A raw title from a request gets the same treatment plus the data's cut to 8 words (DESIGN 2-3), so a title
sent by hand and the same item sent by id make the same prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.prompts import normalize_title
from service.schemas import Item, field_error
from training.data import Catalog, default_data_root, read_catalog

MAX_TITLE_WORDS = 8  # the released data cuts titles to 8 words; raw titles get the same cut


class CatalogError(RuntimeError):
    """A catalog needed by a served domain is missing or unreadable."""


@dataclass(frozen=True)
class Resolved:
    """An item as scored: its title, and its catalog id / asin when it came from the catalog."""

    title: str
    id: int | None = None
    asin: str | None = None


def prompt_title(raw: str) -> str:
    """A raw request title as the prompt uses it: unescaped, whitespace-normalised, first 8 words; one that is
    empty after unescaping (e.g. `&nbsp;`) is `unknown item`, as the catalogs' empty titles are."""
    return " ".join(normalize_title(raw).split(" ")[:MAX_TITLE_WORDS])


class Catalogs:
    """The catalogs of the served domains, resolving request items to titles."""

    def __init__(self, catalogs: Mapping[str, Catalog]):
        self._catalogs = dict(catalogs)

    @classmethod
    def load(cls, domains: Iterable[str], root: str | Path | None = None) -> Catalogs:
        base = Path(root) if root is not None else default_data_root()
        catalogs = {}
        for domain in domains:
            path = base / domain / "items.jsonl"
            if not path.is_file():
                raise CatalogError(f"no catalog for served domain {domain} at {path}; set XCROSS_DATA_DIR to the "
                                   "amazon-xcross data directory (it holds <Domain>/items.jsonl)")
            try:
                catalogs[domain] = read_catalog(path, domain)
            except (ValueError, KeyError, OSError) as exc:
                raise CatalogError(f"{path}: unreadable catalog ({exc}); re-copy the data") from exc
        return cls(catalogs)

    @property
    def domains(self) -> list[str]:
        return sorted(self._catalogs)

    def __getitem__(self, domain: str) -> Catalog:
        return self._catalogs[domain]

    def resolve(self, domain: str, items: Sequence[Item], field: str, errors: list[dict[str, Any]]) -> list[Resolved]:
        """Titles of `items`; appends an error (loc `["body", field, i, key]`) for each unknown id or asin."""
        catalog = self._catalogs[domain]
        out = []
        for i, item in enumerate(items):
            if item.id is not None:
                if item.id < len(catalog):
                    out.append(Resolved(catalog.titles[item.id], item.id, catalog.asins[item.id]))
                    continue
                msg = f"unknown item id {item.id} in {domain}; valid ids are 0..{len(catalog) - 1}"
                errors.append(field_error(["body", field, i, "id"], msg, "unknown_item"))
            elif item.asin is not None:
                idx = catalog.asin_to_id.get(item.asin)
                if idx is not None:
                    out.append(Resolved(catalog.titles[idx], idx, item.asin))
                    continue
                msg = f"unknown asin {item.asin[:64]!r} in {domain}; send the item's catalog id or its title"
                errors.append(field_error(["body", field, i, "asin"], msg, "unknown_item"))
            else:
                out.append(Resolved(prompt_title(item.title or "")))
        return out
