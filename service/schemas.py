"""Request and response models of `POST /recommend` (DESIGN 7), the configurable limits, and the error format.

An item is exactly one of a catalog `id`, an `asin`, or a raw `title`. Types are strict (`"17"` is not an id).
Limits that come from settings (history, candidates, title length) are checked by `check_limits`, so one
schema serves every configuration; the OpenAPI document shows the configured values (see `service.app`).

Every client error, whichever layer finds it, has one shape (FastAPI's, plus a readable summary):
`{"detail": [{"loc": ["body", "candidates", 3, "id"], "msg": "...", "type": "..."}],
  "message": "candidates[3].id: unknown item id 99999 in Tools; valid ids are 0..5819"}`
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)


def _integral(v: Any) -> Any:
    """JSON has one number type: 6190.0 is the integer 6190 to JSON Schema, so it is accepted as one (6190.5, "6190"
    and true are not)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


JsonInt = Annotated[StrictInt, BeforeValidator(_integral)]
"""An integer as JSON Schema's `type: integer` means it: 3 and 3.0, never 3.5, "3" or true."""

# A raw title needs one character outside this set (whitespace in Python's, ECMAScript's and Unicode's sense); the
# OpenAPI document publishes the same pattern, so the schema and the validation accept the same titles.
TITLE_PATTERN = ("[^\\t\\n\\v\\f\\r \\u001c-\\u001f\\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f"
                 "\\u205f\\u3000\\ufeff]")
_TITLE_TEXT = re.compile(TITLE_PATTERN)


class InputError(ValueError):
    """Bad client input found after schema validation (unknown domain or item, limits); carries error dicts."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__(summary(errors))
        self.errors = errors


def field_error(loc: Sequence[str | int], msg: str, type_: str) -> dict[str, Any]:
    """One error in FastAPI's shape; `loc` starts with "body" for fields of the request body."""
    return {"loc": list(loc), "msg": msg, "type": type_}


def field_path(loc: Sequence[str | int]) -> str:
    """`["body", "candidates", 3, "id"]` -> `candidates[3].id` (the body itself is `body`)."""
    parts = list(loc[1:]) if loc and loc[0] == "body" and len(loc) > 1 else list(loc)
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def summary(errors: Sequence[dict[str, Any]], limit: int = 10) -> str:
    lines = [f"{field_path(e['loc'])}: {e['msg']}" for e in errors[:limit]]
    if len(errors) > limit:
        lines.append(f"... and {len(errors) - limit} more errors")
    return "; ".join(lines)


def error_body(errors: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The JSON of every 4xx: the errors (loc, msg, type; no echo of the input) and a one-line summary."""
    detail = [{"loc": list(e["loc"]), "msg": str(e["msg"]), "type": str(e["type"])} for e in errors[:100]]
    return {"detail": detail, "message": summary(errors)}


class Item(BaseModel):
    """One item: exactly one of a catalog `id`, an `asin`, or a raw `title`."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1, "maxProperties": 1})

    id: JsonInt | None = Field(None, ge=0, description="catalog id of the domain (line index of items.jsonl)")
    asin: StrictStr | None = Field(None, min_length=1, max_length=64, description="Amazon ASIN in the catalog")
    title: StrictStr | None = Field(None, min_length=1, description="raw title (HTML-unescaped, whitespace-"
                                                                     "normalised, cut to 8 words)")

    @field_validator("asin", "title")
    @classmethod
    def _unicode(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as exc:
                msg = f"must be valid Unicode text; character {exc.start} is an unpaired surrogate"
                raise ValueError(msg) from None
        return v

    @field_validator("title")
    @classmethod
    def _words(cls, v: str | None) -> str | None:
        if v is not None and not _TITLE_TEXT.search(v):
            raise ValueError("has only whitespace; give at least one word")
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> Item:
        given = [k for k in ("id", "asin", "title") if getattr(self, k) is not None]
        if len(given) != 1:
            got = " and ".join(given) if given else "none of them"
            raise ValueError(f"give exactly one of id, asin or title (got {got})")
        return self


EXAMPLE = {"domain": "Tools", "history": [{"id": 17}, {"title": "Stanley 16-Ounce Claw Hammer"}],
           "candidates": [{"id": 3}, {"id": 99}, {"title": "DEWALT 20V MAX Cordless Drill"}], "top_k": 2}


class RecommendRequest(BaseModel):
    """A user's history (oldest first; may be empty) and the candidates to rank, in one target domain."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EXAMPLE]})

    domain: StrictStr = Field(description="target domain, one of those served (see /readyz)")
    history: list[Item] = Field(default_factory=list, description="items the user interacted with, oldest first")
    candidates: list[Item] | None = Field(None, min_length=1,
                                          description="items to rank; omit it to rank from the domain's whole "
                                                      "catalog: a recall stage picks XCROSS_RECALL_N items for the "
                                                      "history (its items excluded) and the model ranks those "
                                                      "(needs a non-empty history)")
    top_k: JsonInt = Field(10, ge=1, description="how many ranked items to return (at most the candidates)")
    model: StrictStr | None = Field(None, min_length=1, max_length=32,
                                    description="checkpoint kind to rank with, one of those served for the domain "
                                                "(xcross, weaverec, gca, lora; see /readyz); default: the "
                                                "service's (XCROSS_MODEL)")


class RankedItem(BaseModel):
    position: int = Field(description="index of the item in the request's candidates (without candidates: in the "
                                      "recalled list, best recall score first)")
    id: int | None = Field(description="catalog id; null for a raw title")
    asin: str | None = Field(description="ASIN; null for a raw title")
    title: str = Field(description="the title that was scored")
    score: float
    rank: int = Field(description="1 = best")


class RecommendResponse(BaseModel):
    domain: str
    model: str = Field(description="served checkpoint: {kind}:{Domain}@{content hash[:12]}")
    items: list[RankedItem]
    recall: str | None = Field(None, description="the recall stage that chose the candidates when the request "
                                                 "gave none (text:<backbone>/<index>); null when candidates were "
                                                 "given")


class ErrorResponse(BaseModel):
    detail: list[dict[str, Any]]
    message: str


@dataclass(frozen=True)
class Limits:
    """Request limits from settings (XCROSS_MAX_HISTORY, XCROSS_MAX_CANDIDATES, XCROSS_MAX_TITLE_CHARS)."""

    max_history: int = 50
    max_candidates: int = 1000
    max_title_chars: int = 512


def check_limits(req: RecommendRequest, limits: Limits) -> None:
    """Raise `InputError` naming every field over a configured limit."""
    errors = []
    for field, cap, var in (("history", limits.max_history, "XCROSS_MAX_HISTORY"),
                            ("candidates", limits.max_candidates, "XCROSS_MAX_CANDIDATES")):
        n = len(getattr(req, field) or ())
        if n > cap:
            errors.append(field_error(["body", field], f"has {n} items, at most {cap} are allowed ({var}); "
                                                       "send fewer items or split the request", "too_long"))
    if req.top_k > limits.max_candidates:
        errors.append(field_error(["body", "top_k"], f"is {req.top_k}, at most {limits.max_candidates} "
                                                     "(XCROSS_MAX_CANDIDATES)", "less_than_equal"))
    for field in ("history", "candidates"):
        for i, item in enumerate(getattr(req, field) or ()):
            if item.title is not None and len(item.title) > limits.max_title_chars:
                errors.append(field_error(
                    ["body", field, i, "title"],
                    f"has {len(item.title)} characters, at most {limits.max_title_chars} are allowed "
                    "(XCROSS_MAX_TITLE_CHARS); titles are cut to 8 words anyway", "string_too_long"))
    if errors:
        raise InputError(errors)
