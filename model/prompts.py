"""Prompts (DESIGN 3, paper Figure 1): `History: 1: <t> 2: <t> ... Candidate: <t>`, built from cached token pieces.

Each title is tokenized once, without special tokens; a prompt is
`[CLS] + ids("History:") + sum(ids("k:") + title_ids) + ids("Candidate:") + cand_ids + [SEP]`.
For normalised titles (see `normalize_title`) this equals tokenizing the whole prompt string (tested for
WordPiece and SentencePiece). When a prompt is longer than `max_len`, the oldest history items are dropped
first and the kept items are renumbered from 1; the candidate is never dropped (its title is cut only if the
candidate alone does not fit).
"""

from __future__ import annotations

import bisect
import html
import re
from collections.abc import Sequence
from typing import Any

import torch

_WS = re.compile(r"\s+")


def normalize_title(raw: str | None, placeholder: str = "unknown item") -> str:
    """HTML-unescape, collapse whitespace, strip. Empty or null titles become `placeholder`."""
    if raw is None:
        return placeholder
    title = _WS.sub(" ", html.unescape(raw)).strip()
    return title or placeholder


def prompt_text(history: Sequence[str], candidate: str) -> str:
    """The prompt as one string (reference for tests and for readers)."""
    items = " ".join(f"{k}: {t}" for k, t in enumerate(history, start=1))
    return f"History: {items} Candidate: {candidate}" if items else f"History: Candidate: {candidate}"


def encode_pieces(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text without special tokens (the unit that caches store)."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


class PromptBuilder:
    """Assembles prompt ids from per-title ids; pure and cheap (no tokenizer call after construction)."""

    def __init__(self, tokenizer: Any, max_len: int = 256, max_history: int = 50):
        if max_len < 8:
            raise ValueError(f"max_len={max_len} is too small for a prompt; use at least 8 (default 256)")
        self.max_len, self.max_history = max_len, max_history
        self.cls_id, self.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.history_ids, self.candidate_ids = encode_pieces(tokenizer, ["History:", "Candidate:"])
        self.number_ids = encode_pieces(tokenizer, [f"{k}:" for k in range(1, max_history + 1)])

    def build(self, history: Sequence[Sequence[int]], candidate: Sequence[int]) -> list[int]:
        """Ids of one prompt; `history` oldest first, each entry one title's ids."""
        return self.build_many(history, [candidate])[0]

    def build_many(self, history: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]]) -> list[list[int]]:
        """Ids of one prompt per candidate, sharing the history."""
        history = list(history)[-self.max_history :]
        # cost[m] = tokens of the m most recent items, numbered 1..m (non-decreasing in m)
        cost, numbers, titles = [0], 0, 0
        for m in range(1, len(history) + 1):
            numbers += len(self.number_ids[m - 1])
            titles += len(history[-m])
            cost.append(numbers + titles)
        fixed = 2 + len(self.history_ids) + len(self.candidate_ids)
        prompts = []
        for candidate in candidates:
            cand = list(candidate)[: max(0, self.max_len - fixed)]
            keep = bisect.bisect_right(cost, self.max_len - fixed - len(cand)) - 1
            ids = [self.cls_id, *self.history_ids]
            for k, title in enumerate(history[len(history) - keep :]):
                ids += self.number_ids[k]
                ids += title
            prompts.append(ids + self.candidate_ids + cand + [self.sep_id])
        return prompts

    def collate(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to the longest prompt of the batch: (input_ids, attention_mask), both (B, T)."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, : len(p)] = torch.tensor(p, dtype=torch.long)
            mask[row, : len(p)] = 1
        return ids, mask

