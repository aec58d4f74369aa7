"""Speculative decoding with the HF target and an EAGLE3 draft: measures the acceptance length τ.

Per verification step (chain drafting, greedy):
    1. the draft proposes K tokens from the target's aux hidden states of every position so far plus the
       token the target chose last (EAGLE3 at inference: step 0 over all positions, then K-1 steps that feed
       the draft's own hidden state forward from the last position);
    2. the target runs once over [last token, K guesses] with its KV cache and keeps the longest prefix of
       guesses equal to its own greedy choices, plus one token of its own;
    3. τ for the step = accepted + 1.
The decoded text must equal plain greedy decoding of the target: that is the correctness check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dataflow.train.eagle3 import Eagle3Draft, rotary_tables
from dataflow.train.loss import draft_target_ids


@dataclass
class SpecStats:
    steps: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    accepted_at: list[int] = field(default_factory=list)  # accepted_at[k]: steps whose guess k was accepted

    @property
    def tau(self) -> float:
        """Mean tokens per verification step: accepted guesses + the target's own token."""
        return 1.0 + sum(self.accepted_at) / self.steps if self.steps else 0.0

    def per_position(self) -> list[float]:
        """Fraction of steps whose k-th guess was accepted (so the chain got at least k long)."""
        return [a / self.steps if self.steps else 0.0 for a in self.accepted_at]


@torch.inference_mode()
def propose(draft: Eagle3Draft, tokens: torch.Tensor, aux: torch.Tensor, k: int) -> list[int]:
    """tokens (1, T+1): the sequence plus the target's latest token; aux (1, T, 3H) -> K target-vocab ids."""
    T = aux.shape[1]
    cos, sin = rotary_tables(draft.cfg, torch.arange(T + k))
    cache: list[tuple[torch.Tensor, torch.Tensor]] = []
    # Step 0 over every position: token t+1 with the target's features at t.
    hidden = draft.midlayer(draft.embed_tokens(tokens[:, 1:]), draft.fc(aux), cos[:T], sin[:T], cache)
    hidden = hidden[:, -1:]  # (1, 1, H): only the last position drafts forward
    to_target, guesses = draft_target_ids(draft.d2t), []  # (Vd,): the target id of each draft id
    for step in range(k):
        draft_id = draft.logits(hidden)[0, -1].argmax().item()  # host sync: the next step needs the token
        guesses.append(int(to_target[draft_id]))
        if step + 1 < k:
            pos = T - 1 + step + 1  # step s sits at rotary position t + s
            embeds = draft.embed_tokens(torch.tensor([[guesses[-1]]]))
            hidden = draft.midlayer(embeds, hidden, cos[pos : pos + 1], sin[pos : pos + 1], cache)
    return guesses


class Target:
    """The HF target with a KV cache, returning greedy tokens and the aux hidden states EAGLE3 reads."""

    def __init__(self, model, aux_layers: list[int]):
        self.model, self.aux_layers = model, aux_layers

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (1, n) appended after `cache` -> greedy next tokens (n,), aux hidden (1, n, 3H)."""
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, output_hidden_states=True)
        aux = torch.cat([out.hidden_states[a] for a in self.aux_layers], dim=-1)
        return out.logits[0].argmax(-1), aux

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)


def greedy(target: Target, prompt: list[int], max_new: int, eos: set[int]) -> tuple[list[int], float]:
    """Plain greedy decoding with the KV cache: the reference output and the baseline speed."""
    start = time.perf_counter()
    cache = target.new_cache()
    ids = torch.tensor([prompt])
    out: list[int] = []
    while len(out) < max_new:
        next_tokens, _ = target.forward(ids, cache)
        out.append(next_tokens[-1].item())
        if out[-1] in eos:
            break
        ids = torch.tensor([[out[-1]]])
    return out, time.perf_counter() - start


def speculative(
    target: Target, draft: Eagle3Draft, prompt: list[int], max_new: int, eos: set[int], k: int, stats: SpecStats
) -> list[int]:
    """Greedy speculative decoding; returns the generated ids and adds to `stats`."""
    start = time.perf_counter()
    cache = target.new_cache()
    next_tokens, aux = target.forward(torch.tensor([prompt]), cache)
    seq, out = list(prompt), [next_tokens[-1].item()]
    while len(out) < max_new and out[-1] not in eos:
        guesses = propose(draft, torch.tensor([seq + [out[-1]]]), aux, k)
        verified, new_aux = target.forward(torch.tensor([[out[-1], *guesses]]), cache)
        accepted = 0
        while accepted < k and guesses[accepted] == verified[accepted].item():
            accepted += 1
        stats.steps += 1
        stats.accepted_at.extend([0] * (k - len(stats.accepted_at)))
        for i in range(accepted):
            stats.accepted_at[i] += 1
        seq += [out[-1], *guesses[:accepted]]
        out += [*guesses[:accepted], verified[accepted].item()]
        aux = torch.cat([aux, new_aux[:, : accepted + 1]], dim=1)
        if accepted < k:  # drop the rejected guesses' keys/values (negative = how many, in every version)
            cache.crop(accepted - k)
        if eos.intersection(out[-accepted - 1 :]):
            break
    out = out[:max_new]
    for i, token in enumerate(out):  # cut after the first EOS, as greedy decoding stops there
        if token in eos:
            out = out[: i + 1]
            break
    stats.new_tokens += len(out)
    stats.seconds += time.perf_counter() - start
    return out
