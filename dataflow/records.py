"""The run's two shared records: what the rollout found about its target, and the draft vocabulary it fixed.

The rollout writes them once it has prepared the run; the trainer, `status` and Ray's actors read them. They
cross processes as JSON values in the run's meta table (keys `target` and `vocab`), each through one encoder
(`to_meta`) and one decoder (`from_meta`). A record carries a `version`; the records written before versions
existed read as version 1 (their fields are exactly version 1's). A record of an unknown version or missing a
field is one clear error, not a KeyError deep in the trainer. No torch here: rollout, train and status import it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from dataflow.errors import InputError

TARGET_KEY, VOCAB_KEY = "target", "vocab"  # their keys in the run's meta table


def _decode(cls, key: str, value: Any) -> dict:
    """The fields of a `cls` record from its JSON value, checked: a known version and every field present."""
    if not isinstance(value, dict):
        raise InputError(f"run meta {key!r}: not a record ({type(value).__name__}); start a new run with a fresh --db")
    version = value.get("version", 1)  # records written before versions existed are version 1
    if version != cls.VERSION:
        raise InputError(f"run meta {key!r}: record version {version!r}, but this dataflow reads version "
                         f"{cls.VERSION}; use the dataflow that started this run, or start a new run with a fresh --db")
    fields = [f for f in dataclasses.fields(cls) if f.name != "version"]
    missing = [f.name for f in fields if f.name not in value and f.default is dataclasses.MISSING]
    if missing:
        raise InputError(f"run meta {key!r}: the record lacks {', '.join(missing)}; it was not written by the "
                         "rollout of this dataflow: start a new run with a fresh --db")
    return {f.name: value[f.name] for f in fields if f.name in value}


@dataclass(frozen=True, kw_only=True)
class TargetRecord:
    """The target model the run's features come from (the rollout's engine describes it)."""

    VERSION: ClassVar[int] = 1

    model: str  # its local HF directory, resolved (the trainer loads the frozen head from it)
    hidden_size: int
    vocab_size: int
    num_hidden_layers: int
    aux_layers: tuple[int, ...]  # the hidden-state layers whose concatenation is `aux_hidden`
    dtype: str  # the features' dtype, e.g. "float32", "bfloat16"
    max_length: int  # the rollout's --max-length: no sample is longer
    version: int = VERSION

    def __post_init__(self):
        object.__setattr__(self, "aux_layers", tuple(self.aux_layers))  # a JSON list in, a tuple held

    @classmethod
    def from_meta(cls, value: Any) -> TargetRecord:
        return cls(**_decode(cls, TARGET_KEY, value))

    def to_meta(self) -> dict:
        return {**dataclasses.asdict(self), "aux_layers": list(self.aux_layers)}


@dataclass(frozen=True, kw_only=True)
class VocabRecord:
    """The draft vocabulary: draft id i stands for target id i + d2t[i] (target ids strictly increasing), and
    how it was chosen (None where it was not counted, e.g. a test's vocabulary)."""

    VERSION: ClassVar[int] = 1

    d2t: tuple[int, ...]  # target_id - draft_id, per draft id (what SGLang and vLLM add to the draft's argmax)
    counted_samples: int | None = None  # samples whose replies were counted
    source: str | None = None  # "dataset replies" or "regenerated replies"
    counted_tokens: int | None = None  # trained tokens counted over them
    distinct_counted: int | None = None
    coverage: float | None = None  # share of the counted tokens inside the draft vocabulary
    version: int = VERSION

    def __post_init__(self):
        object.__setattr__(self, "d2t", tuple(self.d2t))  # a JSON list in, a tuple held
        ids = self.target_ids() if all(isinstance(d, int) for d in self.d2t) else []
        if not ids or any(a >= b for a, b in zip(ids, ids[1:])):
            raise InputError(f"run meta {VOCAB_KEY!r}: d2t must be a non-empty list of ints whose target ids increase; "
                             "start a new run with a fresh --db")

    @property
    def draft_vocab_size(self) -> int:
        return len(self.d2t)

    def target_ids(self) -> list[int]:
        """The target id of each draft id, in draft-id order."""
        return [draft_id + offset for draft_id, offset in enumerate(self.d2t)]

    @classmethod
    def from_target_ids(cls, target_ids: list[int], **how) -> VocabRecord:
        """The vocabulary of these target ids (sorted here); `how`: the counting fields."""
        return cls(d2t=tuple(t - d for d, t in enumerate(sorted(target_ids))), **how)

    @classmethod
    def from_meta(cls, value: Any) -> VocabRecord:
        size = value.get("draft_vocab_size") if isinstance(value, dict) else None
        fields = _decode(cls, VOCAB_KEY, value)
        if not isinstance(fields["d2t"], list) or len(fields["d2t"]) != size:
            raise InputError(f"run meta {VOCAB_KEY!r}: d2t must be a list of draft_vocab_size ints; "
                             "start a new run with a fresh --db")
        return cls(**fields)

    def to_meta(self) -> dict:
        return {**dataclasses.asdict(self), "d2t": list(self.d2t), "draft_vocab_size": self.draft_vocab_size}


def read_target(meta) -> TargetRecord | None:
    """The run's target record, or None before the rollout wrote it (meta: RunMeta or a ledger proxy)."""
    value = meta.get(TARGET_KEY)
    return None if value is None else TargetRecord.from_meta(value)


def read_vocab(meta) -> VocabRecord | None:
    """The run's vocab record, or None before the rollout fixed it."""
    value = meta.get(VOCAB_KEY)
    return None if value is None else VocabRecord.from_meta(value)


def write_target(meta, record: TargetRecord) -> None:
    meta.set(TARGET_KEY, record.to_meta())


def write_vocab_once(meta, record: VocabRecord) -> VocabRecord:
    """Record the vocabulary unless the run has one; returns the run's (the first writer wins)."""
    return VocabRecord.from_meta(meta.set_once(VOCAB_KEY, record.to_meta()))
