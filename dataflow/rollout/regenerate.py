"""On-policy text: the target writes the assistant replies, and (Magpie-style) the user prompts too.

Replies: every assistant turn of a conversation is replaced, turn by turn, by what the target says given
the turns before it; a final user turn gets a reply. Self-written prompts: the target sees only its chat
template's header of a user turn (for ChatML, the system turn and "<|im_start|>user\n") and samples the
user's message; its end-of-turn token ends it. Prompts are de-duplicated (after normalising case and
spaces) against each other and against every prompt that must stay unseen (the held-out eval rows).
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Callable, Iterable

import torch

from dataflow.keys import prompt_of
from dataflow.rollout.data import Conversation
from dataflow.rollout.template import render

USER_SENTINEL = "\x00user-turn\x00"
MIN_PROMPT_CHARS = 8  # shorter self-written prompts are mostly "Hi" or a stray fragment


def regenerate_replies(
    engine, samples: list[Conversation], *, max_new_tokens: int, temperature: float, seed: int,
    greedy_first: bool = False, contenders: torch.Tensor | None = None,
) -> list[Conversation]:
    """Each conversation with every assistant turn (and a reply to a final user turn) written by the target,
    turn by turn, batched across conversations. Sampling is seeded by `seed` and the samples' ids, so a
    batch regenerated again (after a restart) gets the same replies and copies of one prompt differ.
    `greedy_first`: a prompt's first copy (--samples-per-prompt) is written greedily, the others at
    `temperature`. `contenders`: see HFEngine.complete."""
    torch.manual_seed(seed ^ zlib.crc32("\n".join(s.id for s in samples).encode()))
    conversations = [list(s.messages) for s in samples]
    todo = [
        [i for i, m in enumerate(c) if m["role"] == "assistant"] + ([len(c)] if c[-1]["role"] == "user" else [])
        for c in conversations
    ]
    temperatures = [0.0 if greedy_first and prompt_of(s.id) == s.id else temperature for s in samples]
    while any(todo):
        round_ = [(c, positions.pop(0)) for c, positions in enumerate(todo) if positions]
        replies = engine.generate(
            [conversations[c][:pos] for c, pos in round_], max_new_tokens=max_new_tokens,
            temperature=[temperatures[c] for c, _ in round_], contenders=contenders,
        )
        for (c, pos), reply in zip(round_, replies):
            conversations[c][pos : pos + 1] = [{"role": "assistant", "content": reply}]
    return [dataclasses.replace(s, messages=tuple(c)) for s, c in zip(samples, conversations)]


def user_header(tokenizer) -> str:
    """The chat template's rendering of a conversation up to where the first user message's text starts."""
    rendered = render(tokenizer, [{"role": "user", "content": USER_SENTINEL}])
    return rendered[: rendered.index(USER_SENTINEL)]


def normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def first_user_turn(sample: Conversation) -> str | None:
    return next((m["content"] for m in sample.messages if m["role"] == "user"), None)


def prompt_key(sample: Conversation) -> str:
    """What makes two conversations the same prompt: their user turns, normalised."""
    return "\n".join(normalised(m["content"]) for m in sample.messages if m["role"] == "user")


def self_written_prompts(
    engine,
    count: int,
    *,
    avoid: Iterable[str],
    temperature: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 32,
    on_batch: Callable[[int], None] = lambda n: None,
) -> list[Conversation]:
    """`count` distinct user prompts sampled by the target from its bare user header (ids "@self<i>"),
    none equal to a text in `avoid`. Gives up after 4x`count` attempts and returns what it has."""
    header = user_header(engine.tokenizer)
    seen = {normalised(t) for t in avoid}
    prompts: list[str] = []
    generator_seed, attempts = seed, 0
    while len(prompts) < count and attempts < 4 * count:
        torch.manual_seed(generator_seed)
        batch = engine.complete([header] * batch_size, max_new_tokens=max_new_tokens, temperature=temperature)
        generator_seed, attempts = generator_seed + 1, attempts + batch_size
        for text in batch:
            key = normalised(text)
            if len(key) >= MIN_PROMPT_CHARS and key not in seen and len(prompts) < count:
                seen.add(key)
                prompts.append(text)
        on_batch(len(prompts))
    return [Conversation(id=f"@self{i}", messages=({"role": "user", "content": p},)) for i, p in enumerate(prompts)]


def without_duplicate_prompts(samples: list[Conversation], avoid: Iterable[str]) -> tuple[list[Conversation], int]:
    """The samples minus repeats (same user turns as an earlier sample) and minus those whose first user
    turn is in `avoid` (the eval's prompts); and how many were dropped. Text rows are kept."""
    avoided = {normalised(t) for t in avoid}
    seen: set[str] = set()
    kept = []
    for sample in samples:
        first = first_user_turn(sample)
        if first is not None:
            if normalised(first) in avoided or prompt_key(sample) in seen:
                continue
            seen.add(prompt_key(sample))
        kept.append(sample)
    return kept, len(samples) - len(kept)
