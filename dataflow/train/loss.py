"""The TTT loss: soft cross-entropy against the target's distribution, restricted to the draft vocab.

Position i of the target ("teacher") predicts token i+1. It is trained on when token i+1 is an assistant
token and the target's top-1 token is in the draft vocabulary (so the last position, whose next token is
unknown, never is: right padding then changes nothing).
Step k's draft logits at position t are matched with teacher position t+k+1.

Sums, not means, leave this module: the trainer divides by one token count per optimiser step
(the loss-mask tokens of every micro-batch on every rank), so gradient accumulation and data
parallelism give the same update as one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STEP_DECAY = 0.8  # EAGLE3: weight of TTT step k is 0.8**k


@dataclass(frozen=True)
class Teacher:
    probs: torch.Tensor  # (B, T, Vd) float32: softmax of the target's logits over the draft vocab
    top: torch.Tensor  # (B, T) int64: the target's top-1 token id (full vocab)
    valid: torch.Tensor  # (B, T) bool: trained on (see module docstring)


def predicts_assistant(loss_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: teacher position i predicts an assistant token i+1."""
    return torch.cat([loss_mask[:, 1:], torch.zeros_like(loss_mask[:, :1])], dim=1)


def draft_target_ids(d2t: torch.Tensor) -> torch.Tensor:
    """(Vd,) int64: the target id of each draft id."""
    return d2t + torch.arange(d2t.numel(), device=d2t.device)


def teacher(target_hidden: torch.Tensor, lm_head: torch.Tensor, loss_mask: torch.Tensor, *,
            t2d: torch.Tensor, draft_ids: torch.Tensor) -> Teacher:
    """target_hidden (B, T, H), frozen lm_head (V, H), loss_mask (B, T) bool, t2d (V,) bool,
    draft_ids (Vd,) = draft_target_ids(d2t) (an index, not a mask: no host sync on GPU)."""
    with torch.no_grad():
        full = target_hidden.to(lm_head.dtype) @ lm_head.T  # (B, T, V)
        top = full.argmax(dim=-1)  # (B, T)
        probs = full.index_select(-1, draft_ids).float().softmax(dim=-1)  # (B, T, Vd)
        valid = predicts_assistant(loss_mask) & t2d[top]
    return Teacher(probs=probs, top=top, valid=valid)


@dataclass
class StepSums:
    """Per-TTT-step sums over one micro-batch; `loss_sum` carries the graph."""

    loss_sum: list[torch.Tensor]  # soft CE summed over valid positions, per step
    correct: list[torch.Tensor]  # draft top-1 == target top-1, counted over valid positions
    count: list[torch.Tensor]  # valid positions

    def weighted_loss(self) -> torch.Tensor:
        return sum(STEP_DECAY**k * s for k, s in enumerate(self.loss_sum))


def ttt_sums(logits: list[torch.Tensor], t: Teacher, d2t: torch.Tensor) -> StepSums:
    """logits: per step (B, T, Vd) from Eagle3Draft.forward."""
    sums = StepSums(loss_sum=[], correct=[], count=[])
    T = t.top.shape[1]
    draft_to_target = draft_target_ids(d2t)  # (Vd,)
    for k, step_logits in enumerate(logits):
        n = T - k - 1  # positions with a teacher at t+k+1
        logp = step_logits[:, :n].float().log_softmax(dim=-1)  # (B, n, Vd)
        probs, top, valid = t.probs[:, k + 1 :], t.top[:, k + 1 :], t.valid[:, k + 1 :]
        ce = -(probs * logp).sum(dim=-1)  # (B, n)
        sums.loss_sum.append((ce * valid).sum())
        guess = draft_to_target[logp.argmax(dim=-1)]  # (B, n) target ids
        sums.correct.append(((guess == top) & valid).sum().detach())
        sums.count.append(valid.sum())
    return sums


def loss_tokens(loss_mask: torch.Tensor) -> torch.Tensor:
    """The normaliser: teacher positions that predict an assistant token at step 0 (known before the forward)."""
    return predicts_assistant(loss_mask)[:, 1:].sum()  # step 0 starts at teacher position 1
