"""Datasets: jsonl rows of conversations (native or ShareGPT) or pre-formatted text, validated per line.

    {"id": "a1", "conversations": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
    {"id": "a2", "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}
    {"id": "a3", "text": "pre-formatted text, trained on every token"}

A row without "id" gets "line<N>". `held_out` conversation rows spread evenly through the file are the eval's
prompts (`split_held_out`): rollouts never train on them, `dataflow eval` prompts only with them. Spread, not the
last rows: a file grouped by topic (the bundled one is) would otherwise hold out, and evaluate on, its last topic
alone, and train on little of it.
Bad rows are reported with file and line number; `on_bad_row="skip"` drops them (and counts them),
`"fail"` raises one InputError that also says how many would be skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from dataflow.errors import InputError

DEFAULT_HELD_OUT = 16
"""Conversation rows kept for `dataflow eval`, spread through the dataset (rollout --held-out, eval --held-out)."""

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}


@dataclass(frozen=True, kw_only=True)
class Conversation:
    """One dataset row: either `messages` (role/content dicts) or `text` (pre-formatted), never both."""

    id: str
    messages: tuple[dict, ...] = ()
    text: str | None = None

    def to_payload(self) -> dict:
        return {"id": self.id, "messages": list(self.messages), "text": self.text}

    @classmethod
    def from_payload(cls, payload: dict) -> Conversation:
        return cls(id=payload["id"], messages=tuple(payload["messages"]), text=payload["text"])


@dataclass(frozen=True)
class LoadedDataset:
    samples: list[Conversation]
    skipped: list[str]  # "file:line: why" for each bad row dropped


class BadRow(ValueError):
    pass


def default_dataset_path() -> Path:
    return Path(str(resources.files("dataflow.rollout").joinpath("data/default.jsonl")))


def load_dataset(path: Path | None = None, on_bad_row: Literal["skip", "fail"] = "fail") -> LoadedDataset:
    path = default_dataset_path() if path is None else Path(path)
    if not path.is_file():
        raise InputError(f"dataset {path}: no such file; pass --dataset a .jsonl file of conversations")
    samples: list[Conversation] = []
    problems: list[str] = []
    seen: set[str] = set()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                sample = parse_row(decode_line(raw), default_id=f"line{lineno}")
                if sample.id in seen:
                    raise BadRow(f"duplicate id {sample.id!r}")
            except BadRow as e:
                problems.append(f"{path}:{lineno}: {e}")
                continue
            seen.add(sample.id)
            samples.append(sample)
    if problems and on_bad_row == "fail":
        raise InputError(
            f"{problems[0]} ({len(problems)} bad rows in all); fix them or pass --on-bad-row skip to drop them"
        )
    if not samples:
        raise InputError(f"dataset {path}: no usable rows; each line must be a JSON object with conversations")
    return LoadedDataset(samples, problems)


def decode_line(raw: bytes) -> str:
    """A line as UTF-8; anything else is a bad row (silently replaced bytes would train on garbage)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRow(f"invalid UTF-8 at byte {e.start} of the line ({raw[e.start:e.start + 4]!r})") from None


def spread(items: list, n: int) -> list:
    """`n` of `items` evenly spaced through them, each from the middle of its stretch (all of them if fewer)."""
    if n >= len(items):
        return list(items)
    return [items[(2 * i + 1) * len(items) // (2 * n)] for i in range(n)]


def split_held_out(samples: list[Conversation], held_out: int) -> tuple[list[Conversation], list[Conversation]]:
    """(rows to train on, the eval's rows): `held_out` conversation rows spread evenly through the file."""
    conversations = [i for i, s in enumerate(samples) if s.messages]
    if held_out and held_out >= len(conversations):
        raise InputError(
            f"--held-out {held_out}: the dataset has only {len(conversations)} conversation rows, which leaves "
            "none to train on; pass a smaller --held-out"
        )
    kept_out = set(spread(conversations, held_out)) if held_out else set()
    return [s for i, s in enumerate(samples) if i not in kept_out], [samples[i] for i in sorted(kept_out)]


def parse_row(line: str, default_id: str) -> Conversation:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRow(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise BadRow("not a JSON object")
    sample_id = str(row.get("id", default_id))
    if "#" in sample_id or "@" in sample_id:  # '#' separates the epoch suffix in ref keys, '@' a copy's
        raise BadRow(f"id {sample_id!r} contains '#' or '@' (reserved in sample keys)")
    if isinstance(row.get("text"), str):
        if not row["text"].strip():
            raise BadRow("empty text")
        return Conversation(id=sample_id, text=row["text"])
    turns = row.get("conversations", row.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise BadRow('no "conversations" list (or "text") or it is empty')
    return Conversation(id=sample_id, messages=tuple(normalise_turn(t) for t in turns))


def normalise_turn(turn) -> dict:
    if not isinstance(turn, dict):
        raise BadRow("a conversation turn is not an object")
    role = turn.get("role", turn.get("from"))
    content = turn.get("content", turn.get("value"))
    if role not in ROLE_ALIASES:
        raise BadRow(f"unknown role {role!r} (expected one of {sorted(ROLE_ALIASES)})")
    if not isinstance(content, str):
        raise BadRow(f"turn of role {role!r} has no text content")
    return {"role": ROLE_ALIASES[role], "content": content}
