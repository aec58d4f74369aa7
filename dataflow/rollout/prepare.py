"""Joining a run as a rollout: check the config, record the target and the draft vocabulary, add tasks.

Every step is idempotent, so any number of rollout processes may start (or restart) on one DB.
"""

from __future__ import annotations

import hashlib
import random

from dataflow.control.meta import RunMeta
from dataflow.control.tasks import TaskQueue
from dataflow.errors import InputError
from dataflow.rollout.config import RolloutConfig
from dataflow.rollout.data import Sample, default_dataset_path, load_dataset
from dataflow.rollout.engines.hf import HFEngine
from dataflow.rollout.template import UNRENDERABLE, TokenizedSample, tokenize_sample
from dataflow.rollout.ui import RolloutView
from dataflow.rollout.vocab import count_tokens, draft_vocab

DEFAULT_DRAFT_VOCAB = 32000


def task_key(sample_id: str, epoch: int) -> str:
    return sample_id if epoch == 0 else f"{sample_id}#e{epoch}"


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
    samples = dataset.samples[: config.num_samples]
    meta.check_config("rollout", run_identity(config, engine, draft_vocab_size))
    meta.set("target", {**engine.describe(), "max_length": config.max_length})
    if meta.get("vocab") is None:
        meta.set("vocab", vocab_pass(engine, samples, config, draft_vocab_size, view))
    added = tasks.add_many(
        [(task_key(s.id, epoch), {**s.to_payload(), "epoch": epoch}) for epoch, s in epoch_order(samples, config)]
    )
    return {"samples": len(samples), "bad_rows_skipped": len(dataset.skipped), "tasks_added": added}


def epoch_order(samples: list[Sample], config: RolloutConfig) -> list[tuple[int, Sample]]:
    """Each epoch's samples in their own seeded shuffle, epoch after epoch."""
    order = []
    for epoch in range(config.epochs):
        shuffled = list(samples)
        random.Random(config.seed + epoch).shuffle(shuffled)
        order.extend((epoch, s) for s in shuffled)
    return order


def vocab_pass(engine: HFEngine, samples: list[Sample], config: RolloutConfig, size: int, view: RolloutView) -> dict:
    """Tokenise-only pass: the most frequent loss-masked tokens become the draft vocabulary."""
    with view.vocab_pass(len(samples)) as advance:
        tokenized = (renderable(engine, s, config) for s in samples)
        counts = count_tokens(tokenized, on_sample=advance)
    return draft_vocab(counts, engine.vocab_size, size)


def renderable(engine: HFEngine, sample: Sample, config: RolloutConfig) -> TokenizedSample | None:
    """The tokenised sample, or None where the chat template refuses it (the producer reports those)."""
    try:
        return tokenize_sample(
            engine.tokenizer, sample, max_length=config.max_length, train_only_last_turn=config.train_only_last_turn
        )
    except UNRENDERABLE:
        return None
