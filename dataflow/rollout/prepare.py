"""Joining a run as a rollout: check the config, record the target, choose the prompts, fix the draft
vocabulary, add the prompt tasks.

The prompts: the dataset's rows minus the held-out ones (the eval's) and minus repeated prompts, plus
prompts the target writes itself (--self-prompts), each --samples-per-prompt times, epoch after epoch.
The vocabulary: with --regenerate, the first --vocab-warmup samples are regenerated here, before any
feature is published, and the target's own replies are counted (their tasks carry the replies, so the
producer does not write them again); without it, the dataset's replies are counted.

Every step is idempotent, so any number of rollout processes may start (or restart) on one DB: the first
recorded vocabulary wins, a task key is added once, and a restart finds its prompts already in the tasks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import time
from collections import Counter

import torch

from dataflow.control.meta import RunMeta
from dataflow.control.tasks import TaskQueue
from dataflow.errors import InputError
from dataflow.keys import copy_id, epoch_key
from dataflow.records import TargetRecord, read_vocab, write_target, write_vocab_once
from dataflow.rollout.config import RolloutConfig
from dataflow.rollout.data import Conversation, default_dataset_path, load_dataset, split_held_out
from dataflow.rollout.engines.hf import HFEngine
from dataflow.rollout.regenerate import (
    first_user_turn,
    regenerate_replies,
    self_written_prompts,
    without_duplicate_prompts,
)
from dataflow.rollout.template import UNRENDERABLE, TokenizedSample, tokenize_sample
from dataflow.rollout.ui import RolloutView
from dataflow.rollout.vocab import count_tokens, draft_vocab

DEFAULT_DRAFT_VOCAB = 32000
PROMPT_MAX_NEW_TOKENS = 96  # a self-written prompt is a question or an instruction, not an essay


def run_identity(config: RolloutConfig, engine: HFEngine, draft_vocab_size: int) -> dict:
    """What must stay the same for every rollout process of a run."""
    target = engine.describe()
    template = engine.tokenizer.chat_template or ""
    return {
        "target_model": target["model"],
        "aux_layers": target["aux_layers"],
        "dtype": target["dtype"],
        "max_length": config.max_length,
        "draft_vocab_size": draft_vocab_size,
        "dataset": str((config.dataset or default_dataset_path()).resolve()),
        "num_samples": config.num_samples,
        "held_out": config.held_out,
        "self_prompts": config.self_prompts,
        "samples_per_prompt": config.samples_per_prompt,
        "vocab_warmup": config.vocab_warmup,
        "epochs": config.epochs,
        "seed": config.seed,
        "train_only_last_turn": config.train_only_last_turn,
        "regenerate": config.regenerate,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16],
    }


def prepare_run(conn, config: RolloutConfig, engine: HFEngine, view: RolloutView, *, control: tuple | None = None) -> dict:
    """Check/record the run's rollout config, target and vocab; add the prompt tasks. Returns counts.
    control: (meta, tasks) to use instead of ones on conn (Ray mode: proxies of the ledger actor)."""
    meta, tasks = control or (RunMeta(conn), TaskQueue(conn))
    draft_vocab_size = config.draft_vocab_size or min(DEFAULT_DRAFT_VOCAB, engine.vocab_size)
    if draft_vocab_size > engine.vocab_size:
        raise InputError(
            f"--draft-vocab-size {draft_vocab_size}: larger than the target vocabulary; "
            f"pass at most {engine.vocab_size}"
        )
    dataset = load_dataset(config.dataset, config.on_bad_row)
    rows, held_out = split_held_out(dataset.samples, config.held_out)
    meta.record_or_check_config("rollout", run_identity(config, engine, draft_vocab_size))
    write_target(meta, TargetRecord(**engine.describe(), max_length=config.max_length))
    summary = {"bad_rows_skipped": len(dataset.skipped), "held_out": len(held_out)}
    if read_vocab(meta) is not None and sum(tasks.counts().values()):
        return {**summary, "tasks_added": 0}  # a restart: the run's prompts are its tasks already
    prompts, duplicates = training_prompts(engine, rows, held_out, config, view)
    order = epoch_order(with_copies(prompts, config.samples_per_prompt), config)
    view.message(
        f"prompts: {len(prompts)} ({len(held_out)} rows held out for eval, {duplicates} repeats dropped), "
        f"x{config.samples_per_prompt} replies{' (the first greedy)' if config.greedy_first_reply else ''} "
        f"x{config.epochs} epochs = {len(order)} samples"
    )
    warm = {}
    if read_vocab(meta) is None:
        warm = record_vocab(meta, engine, order, rows, config, draft_vocab_size, view)
    added = tasks.add_many(
        [(epoch_key(s.id, epoch), task_payload(s, epoch, warm.get(i))) for i, (epoch, s) in enumerate(order)]
    )
    return {**summary, "prompts": len(prompts), "duplicates_dropped": duplicates, "tasks_added": added}


def training_prompts(
    engine: HFEngine, rows: list[Conversation], held_out: list[Conversation], config: RolloutConfig, view: RolloutView
) -> tuple[list[Conversation], int]:
    """The dataset's rows (first --num-samples) without repeats or eval prompts, plus self-written prompts;
    and how many rows were dropped as repeats."""
    eval_prompts = [p for p in map(first_user_turn, held_out) if p is not None]
    seeds, duplicates = without_duplicate_prompts(rows[: config.num_samples], avoid=eval_prompts)
    if not config.self_prompts:
        return seeds, duplicates
    with view.stage("self-written prompts", config.self_prompts) as advance:
        own = self_written_prompts(
            engine, config.self_prompts, avoid=eval_prompts + [p for p in map(first_user_turn, seeds) if p],
            temperature=config.prompt_temperature, max_new_tokens=PROMPT_MAX_NEW_TOKENS, seed=config.seed,
            batch_size=config.tasks_per_lease, on_batch=advance,
        )
    if len(own) < config.self_prompts:
        view.message(f"the target wrote only {len(own)} distinct prompts of {config.self_prompts} asked for")
    return seeds + own, duplicates


def with_copies(samples: list[Conversation], copies: int) -> list[Conversation]:
    """Each sample `copies` times; copy k > 0 is keyed "<id>@<k>" (its own task, its own sampled replies)."""
    return [s if k == 0 else dataclasses.replace(s, id=copy_id(s.id, k)) for s in samples for k in range(copies)]


def epoch_order(samples: list[Conversation], config: RolloutConfig) -> list[tuple[int, Conversation]]:
    """Each epoch's samples in their own seeded shuffle, epoch after epoch."""
    order = []
    for epoch in range(config.epochs):
        shuffled = list(samples)
        random.Random(config.seed + epoch).shuffle(shuffled)
        order.extend((epoch, s) for s in shuffled)
    return order


def task_payload(sample: Conversation, epoch: int, regenerated: Conversation | None) -> dict:
    """A task's payload; a warm-up sample carries the replies the target already wrote for it."""
    if regenerated is None:
        return {**sample.to_payload(), "epoch": epoch}
    return {**regenerated.to_payload(), "epoch": epoch, "regenerated": True}


def record_vocab(
    meta: RunMeta, engine: HFEngine, order: list[tuple[int, Conversation]], rows: list[Conversation],
    config: RolloutConfig, size: int, view: RolloutView,
) -> dict[int, Conversation]:
    """Count the replies, record the draft vocabulary (first writer wins); returns the warm-up samples
    regenerated for it, by position in `order`."""
    contenders, started = torch.zeros(engine.vocab_size), time.monotonic()
    if config.regenerate:
        warm = regenerate_warmup(engine, order[: config.vocab_warmup], config, view, contenders)
        view.message(f"vocabulary warm-up: the target wrote {len(warm)} samples' replies in "
                     f"{time.monotonic() - started:.0f}s")
        counted = [warm.get(i, s) for i, (_, s) in enumerate(order[: config.vocab_warmup])]
    else:
        warm, counted = {}, [s for epoch, s in order if epoch == 0]
    with view.stage("draft vocabulary", len(counted)) as advance:
        counts = count_tokens((renderable(engine, s, config) for s in counted), on_sample=advance)
    likely = Counter({t: n for t, n in enumerate(contenders.tolist()) if n > 0})
    seen = Counter(t for s in rows if (tokenized := renderable(engine, s, config)) for t in tokenized.input_ids)
    vocab = draft_vocab(counts, engine.vocab_size, size, fallbacks=(seen, likely))
    source = "regenerated replies" if config.regenerate else "dataset replies"
    recorded = write_vocab_once(meta, dataclasses.replace(vocab, counted_samples=len(counted), source=source))
    if recorded.coverage is not None:
        view.message(
            f"draft vocabulary: {size} ids from {recorded.counted_samples} samples' {recorded.source}; "
            f"covers {recorded.coverage:.1%} of their {recorded.counted_tokens} trained tokens "
            f"({recorded.distinct_counted} distinct)"
        )
    return warm


def regenerate_warmup(
    engine: HFEngine, warmup: list[tuple[int, Conversation]], config: RolloutConfig, view: RolloutView,
    contenders: torch.Tensor,
) -> dict[int, Conversation]:
    """The warm-up conversations with the target's replies, in batches of --tasks-per-lease (counting the
    target's top next-token candidates while writing them into `contenders`)."""
    todo = [i for i, (_, s) in enumerate(warmup) if s.text is None]
    out: dict[int, Conversation] = {}
    with view.stage("vocabulary warm-up (regenerating)", len(todo)) as advance:
        for start in range(0, len(todo), config.tasks_per_lease):
            batch = todo[start : start + config.tasks_per_lease]
            replies = regenerate_replies(
                engine, [warmup[i][1] for i in batch], max_new_tokens=config.max_new_tokens,
                temperature=config.temperature, seed=config.seed, greedy_first=config.greedy_first_reply,
                contenders=contenders,
            )
            out.update(zip(batch, replies))
            advance(len(out))
    return out


def renderable(engine: HFEngine, sample: Conversation, config: RolloutConfig) -> TokenizedSample | None:
    """The tokenised sample, or None where the chat template refuses it (the producer reports those)."""
    try:
        return tokenize_sample(
            engine.tokenizer, sample, max_length=config.max_length, train_only_last_turn=config.train_only_last_turn
        )
    except UNRENDERABLE:
        return None
