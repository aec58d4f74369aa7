"""The draft vocabulary: a sorted subset of the target's token ids.

EAGLE3 drafts predict over `draft_vocab_size` ids only. Two buffers travel with the checkpoint:
`d2t[i] = target_id - i` for draft id i (SGLang/vLLM add it to the draft's argmax) and `t2d[v]` = whether
target id v is in the draft vocabulary. The run records d2t as a VocabRecord (dataflow/records.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dataflow.errors import InputError
from dataflow.records import VocabRecord


@dataclass(frozen=True)
class VocabMap:
    d2t: torch.Tensor  # (Vd,) int64: target_id - draft_id
    t2d: torch.Tensor  # (V,) bool: target id is in the draft vocab

    @property
    def draft_vocab_size(self) -> int:
        return self.d2t.numel()

    @property
    def vocab_size(self) -> int:
        return self.t2d.numel()


def vocab_from_target_ids(target_ids: list[int] | torch.Tensor, vocab_size: int) -> VocabMap:
    """The mapping that keeps `target_ids` (any order, no duplicates) out of a vocabulary of `vocab_size`."""
    ids = torch.as_tensor(target_ids, dtype=torch.int64).sort().values
    if ids.numel() == 0 or ids.unique().numel() != ids.numel():
        raise InputError("draft vocabulary: target ids must be non-empty and distinct; rebuild the mapping")
    if ids[0] < 0 or ids[-1] >= vocab_size:
        raise InputError(f"draft vocabulary: target ids must lie in [0, {vocab_size}); rebuild the mapping")
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return VocabMap(d2t=ids - torch.arange(ids.numel()), t2d=t2d)


def vocab_from_record(record: VocabRecord, vocab_size: int) -> VocabMap:
    """The run's recorded vocabulary (its decoder checked d2t), checked against the target's vocabulary size."""
    return vocab_from_target_ids(record.target_ids(), vocab_size)
