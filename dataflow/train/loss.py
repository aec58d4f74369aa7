"""The TTT loss: soft cross-entropy against the target's distribution, restricted to the draft vocab.

Position i of the target ("teacher") predicts token i+1. It is trained on when token i+1 is an assistant
token and the target's top-1 token is in the draft vocabulary (so the last position, whose next token is
unknown, never is: right padding then changes nothing).
Step k's draft logits at position t are matched with teacher position t+k+1.

Only what is trained is computed: the teacher's logits at positions that predict an assistant token, the
draft's logits at positions whose teacher is trained on. The draft's lm_head, softmax and loss gradient are
fused per chunk of rows (`linear_soft_ce`), so no (rows, draft vocab) tensor outlives its chunk.

Sums, not means, leave this module: the trainer divides by one token count per optimiser step
(the loss-mask tokens of every micro-batch on every rank), so gradient accumulation and data
parallelism give the same update as one big batch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch

STEP_DECAY = 0.8  # EAGLE3: weight of TTT step k is 0.8**k
CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 2048 rows at an 8192-token draft vocab (32 MB in bf16)


@dataclass(frozen=True)
class Teacher:
    """The target at the teacher positions that are trained on, ordered by position in the row, so that the
    ones step k uses (positions >= k+1) are a suffix: no copy of `probs` per step."""

    rows: torch.Tensor  # (n,) int64: flat index b*T + i of each trained teacher position
    positions: torch.Tensor  # (n,) int64: i, ascending
    probs: torch.Tensor  # (n, Vd) in the head's dtype: softmax (in fp32) of the target's logits over the draft vocab
    top: torch.Tensor  # (n,) int64: the target's top-1 token id (full vocab)

    def step_start(self, ttt_length: int) -> list[int]:
        """First row each TTT step uses (teacher position >= k+1)."""
        firsts = torch.arange(1, ttt_length + 1, device=self.positions.device)
        return torch.searchsorted(self.positions, firsts).tolist()  # host sync: slice bounds


def predicts_assistant(loss_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: teacher position i predicts an assistant token i+1."""
    return torch.cat([loss_mask[:, 1:], torch.zeros_like(loss_mask[:, :1])], dim=1)


def draft_target_ids(d2t: torch.Tensor) -> torch.Tensor:
    """(Vd,) int64: the target id of each draft id."""
    return d2t + torch.arange(d2t.numel(), device=d2t.device)


def chunk_rows(width: int, elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, elements // width)


@dataclass(frozen=True)
class TeacherHead:
    """The frozen target lm_head with the draft vocabulary's rows first: the draft-vocab logits are then the
    first Vd columns of the full logits (a slice, not a column gather), and top-1 in the draft vocab is
    `row < Vd`."""

    weight: torch.Tensor  # (V, H) in the compute dtype
    target_ids: torch.Tensor  # (V,) int64: target id of each row
    draft_size: int


def teacher_head(lm_head: torch.Tensor, draft_ids: torch.Tensor, dtype: torch.dtype) -> TeacherHead:
    rest = torch.ones(lm_head.shape[0], dtype=torch.bool, device=lm_head.device)
    rest[draft_ids] = False
    order = torch.cat([draft_ids, rest.nonzero().squeeze(1)])
    return TeacherHead(weight=lm_head.index_select(0, order).to(dtype), target_ids=order, draft_size=draft_ids.numel())


def teacher_core(full: torch.Tensor, draft_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """full (c, V) logits over TeacherHead rows -> (top-1 row (c,), softmax over the draft vocab (c, Vd)).

    The softmax is taken in fp32 and kept in the logits' dtype: in bf16, the loss reads half the bytes at
    every TTT step (each step reads the probabilities once)."""
    return full.argmax(dim=-1), torch.softmax(full[:, :draft_size], dim=-1, dtype=torch.float32).to(full.dtype)


# full-vocab logits per chunk: 341 rows at 49152 (32 MB in bf16). Measured at the bench's shapes (2,048 rows,
# 2 threads): the teacher takes 0.167 s in 32 MB chunks, 0.183 s in 64 MB ones, 0.169 s in 16 MB, 0.20 s in 8 MB.
TEACHER_CHUNK_ELEMENTS = 1 << 24


def teacher(target_hidden: torch.Tensor, head: TeacherHead, loss_mask: torch.Tensor,
            core: Callable = teacher_core) -> Teacher:
    """target_hidden (B, T, H), loss_mask (B, T) bool. Full-vocab logits exist one chunk at a time, in the
    head's dtype; the softmax over the draft vocab is taken in fp32 and kept in the head's dtype."""
    B, T, H = target_hidden.shape
    with torch.no_grad():
        # (T, B) order: ascending position i, then batch row
        wanted = predicts_assistant(loss_mask).t().reshape(-1).nonzero().squeeze(1)  # host sync: row count
        rows = (wanted % B) * T + wanted // B
        flat = target_hidden.reshape(B * T, H)
        kept_rows, probs, tops = [], [], []
        for chunk in rows.split(chunk_rows(head.weight.shape[0], TEACHER_CHUNK_ELEMENTS)):
            full = flat.index_select(0, chunk).to(head.weight.dtype) @ head.weight.T  # (c, V)
            top, chunk_probs = core(full, head.draft_size)
            keep = (top < head.draft_size).nonzero().squeeze(1)  # host sync: kept count
            probs.append(chunk_probs.index_select(0, keep))
            kept_rows.append(chunk[keep])
            tops.append(head.target_ids[top[keep]])
        rows = torch.cat(kept_rows) if kept_rows else rows
        probs = (torch.cat(probs) if probs
                 else torch.zeros(0, head.draft_size, dtype=head.weight.dtype, device=rows.device))
        top = torch.cat(tops) if tops else rows
    return Teacher(rows=rows, positions=rows % T, probs=probs, top=top)


def soft_ce_core(logits: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (c, Vd), probs (c, Vd) -> (summed soft CE, argmax (c,), d CE / d logits in logits' dtype).

    CE = logsumexp(logits) - <probs, logits> per row (probs sum to 1). A pure function, so that
    torch.compile can fuse it into two passes over the logits."""
    logits32 = logits.float()
    peak = logits32.amax(dim=-1, keepdim=True)
    exp = (logits32 - peak).exp()
    total = exp.sum(dim=-1, keepdim=True)
    ce = (total.log() + peak).squeeze(-1) - (probs * logits32).sum(dim=-1)
    grad = (exp / total - probs).to(logits.dtype)
    return ce.sum(), logits32.argmax(dim=-1), grad


CeCore = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class CompiledOrEager:
    """`fn` through torch.compile when asked; a compile (or compiled-run) failure warns once and falls back.

    The backward graph is compiled with the forward (not lazily at the first backward), so that every
    compile failure surfaces here, before any gradient has been accumulated."""

    def __init__(self, fn: Callable, *, compile: bool, what: str):
        self.fn, self.what = fn, what
        # dynamic: row counts and sequence lengths change every step; one graph for all of them
        self.compiled = torch.compile(fn, dynamic=True) if compile else None

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                # no duck sizing: a length that happens to equal the width must not specialise the graph to it
                with torch._functorch.config.patch(force_non_lazy_backward_lowering=True), \
                        torch.fx.experimental._config.patch(use_duck_shape=False):
                    return self.compiled(*args)
            except Exception as e:  # inductor needs a C++ compiler and more; eager is always there
                first_line = (str(e).strip().splitlines() or [""])[0][:200]
                print(f"warning: torch.compile failed ({type(e).__name__}: {first_line}); "
                      f"running {self.what} eagerly", file=sys.stderr, flush=True)
                self.compiled = None
        return self.fn(*args)


class LinearSoftCE(torch.autograd.Function):
    """sum_rows softCE(x[rows] @ weight.T, probs), with the gradients computed chunk by chunk in the forward
    (the logits are never kept); backward only scales them by the incoming gradient. `rows` are distinct,
    so the gradient of the row gather is a copy (index_copy), not an accumulation."""

    @staticmethod
    def forward(ctx, x_all, rows, weight, probs, core):
        x = x_all.index_select(0, rows)  # (n, H)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = None
        loss, guesses = x.new_zeros((), dtype=torch.float32), []
        step = chunk_rows(weight.shape[0])
        for start in range(0, x.shape[0], step):
            xc = x[start : start + step]
            ce, guess, grad = core(xc @ weight.T, probs[start : start + step])  # grad: (c, Vd)
            loss += ce
            guesses.append(guess)
            if grad_x is not None:
                torch.mm(grad, weight, out=grad_x[start : start + step])
            if ctx.needs_input_grad[2]:
                grad_w = grad.T @ xc if grad_w is None else grad_w.addmm_(grad.T, xc)  # (Vd, H)
        if ctx.needs_input_grad[2] and grad_w is None:  # no rows
            grad_w = torch.zeros_like(weight)
        ctx.save_for_backward(rows, grad_x, grad_w)
        ctx.all_rows = x_all.shape[0]
        guess = torch.cat(guesses) if guesses else torch.zeros(0, dtype=torch.int64, device=x.device)
        ctx.mark_non_differentiable(guess)
        return loss, guess

    @staticmethod
    def backward(ctx, grad_loss, _grad_guess):
        rows, grad_x, grad_w = ctx.saved_tensors
        grad_all = None
        if grad_x is not None:
            grad_all = grad_x.new_zeros(ctx.all_rows, grad_x.shape[1])
            grad_all.index_copy_(0, rows, grad_x * grad_loss.to(grad_x.dtype))
        return grad_all, None, grad_w * grad_loss.to(grad_w.dtype) if grad_w is not None else None, None, None


def linear_soft_ce(x_all: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, probs: torch.Tensor,
                   core: CeCore = soft_ce_core) -> tuple[torch.Tensor, torch.Tensor]:
    """x_all (N, H), rows (n,) distinct, weight (Vd, H), probs (n, Vd) -> (summed soft CE of x_all[rows] with
    its graph, draft argmax (n,))."""
    return LinearSoftCE.apply(x_all, rows, weight, probs, core)


@dataclass
class StepSums:
    """Per-TTT-step sums over one micro-batch; `loss_sum` carries the graph."""

    loss_sum: list[torch.Tensor]  # soft CE summed over valid positions, per step
    correct: list[torch.Tensor]  # draft top-1 == target top-1, counted over valid positions
    count: list[int]  # valid positions

    def weighted_loss(self) -> torch.Tensor:
        return sum(STEP_DECAY**k * s for k, s in enumerate(self.loss_sum))


def ttt_sums(model, normed: list[torch.Tensor], t: Teacher, core: CeCore = soft_ce_core) -> StepSums:
    """normed: per step (B, T, H) from Eagle3Draft.normed_states; the draft head runs on trained rows only."""
    sums = StepSums(loss_sum=[], correct=[], count=[])
    draft_to_target = draft_target_ids(model.d2t)  # (Vd,)
    for k, (states, start) in enumerate(zip(normed, t.step_start(len(normed)))):
        rows = t.rows[start:] - (k + 1)  # draft position t = teacher position - k - 1, same batch row
        flat = states.reshape(-1, states.shape[-1])  # (B*T, H)
        loss, guess = linear_soft_ce(flat, rows, model.lm_head.weight, t.probs[start:], core)
        sums.loss_sum.append(loss)
        sums.correct.append((draft_to_target[guess] == t.top[start:]).sum())
        sums.count.append(len(rows))
    return sums


def loss_tokens(loss_mask: torch.Tensor) -> torch.Tensor:
    """The normaliser: teacher positions that predict an assistant token at step 0 (known before the forward)."""
    return predicts_assistant(loss_mask)[:, 1:].sum()  # step 0 starts at teacher position 1
