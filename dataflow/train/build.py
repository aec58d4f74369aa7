"""Builders for the trainer: wait for the run's records, then the draft and the schedule's total."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from dataflow.control.db import database_path
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefQueue
from dataflow.control.tasks import TaskQueue
from dataflow.errors import ConfigMismatch, InputError
from dataflow.records import TargetRecord, VocabRecord, read_target, read_vocab
from dataflow.train.config import TrainConfig, TrainOptions
from dataflow.train.draft_init import init_from_target
from dataflow.train.eagle3 import DraftConfig, Eagle3Draft
from dataflow.train.target import TargetHead, load_target_head
from dataflow.train.vocab import VocabMap, vocab_from_record

POLL_S = 0.5
log = logging.getLogger(__name__)


def wait_for_records(
    meta: RunMeta, on_wait: Callable[[str, float], None], give_up_s: float = 0.0
) -> tuple[TargetRecord, VocabRecord]:
    """The run's `target` and `vocab` records; the rollout writes them once it has prepared its data.
    Starting the trainer first is allowed, so it waits, but it says so at once (a log line, terminal or not:
    a mistyped --db must not look like a hang), and gives up after `give_up_s` (0: waits until stopped)."""
    started, said = time.monotonic(), False
    while (target := read_target(meta)) is None or (vocab := read_vocab(meta)) is None:
        waited = time.monotonic() - started
        if not said:
            stop = f"it gives up after {give_up_s:g}s" if give_up_s else "--wait-for-rollout SECONDS gives up by itself"
            log.info(f"waiting for a rollout to prepare the run in {run_location(meta)} (its target and vocabulary): "
                     f"start `dataflow rollout` with the same --db, or Ctrl-C to stop ({stop})")
            said = True
        if give_up_s and waited >= give_up_s:
            raise InputError(f"{run_location(meta)}: no rollout prepared this run within --wait-for-rollout "
                             f"{give_up_s:g}s; check --db, or start `dataflow rollout` with the same --db first")
        on_wait("waiting for the rollout to record the target and vocab mapping", waited)
        time.sleep(POLL_S)
    return target, vocab


def run_location(meta: RunMeta) -> str:
    """The run database's path (in Ray mode the ledger holds it on another node)."""
    return database_path(meta.conn) if meta.conn is not None else "the run's ledger"


def draft_config(head: TargetHead, target: TargetRecord, vocab: VocabMap, overrides: dict) -> DraftConfig:
    try:
        cfg = DraftConfig.from_target(head.config, draft_vocab_size=vocab.draft_vocab_size, overrides=overrides)
    except (ValueError, KeyError) as e:
        raise InputError(f"--draft-config: {e}") from None
    if cfg.hidden_size != head.embed_tokens.shape[1]:
        raise InputError(
            f"--draft-config hidden_size={cfg.hidden_size} but the target's embeddings are "
            f"{head.embed_tokens.shape[1]} wide (the draft shares them); drop the override"
        )
    if cfg.target_hidden_size != target.hidden_size or cfg.vocab_size != vocab.vocab_size:
        raise InputError(
            f"--draft-config target_hidden_size={cfg.target_hidden_size}, vocab_size={cfg.vocab_size} but the run's "
            f"features are {target.hidden_size} wide over a {vocab.vocab_size}-token vocab; drop the override"
        )
    return cfg


def build_draft(target: TargetRecord, vocab_record: VocabRecord, config: TrainConfig) -> tuple[Eagle3Draft, TargetHead]:
    """The draft on CPU, seeded or from the target's weights (identical on every rank), plus the frozen target
    head."""
    head = load_target_head(Path(target.model))
    if head.lm_head.shape[0] != target.vocab_size:
        raise InputError(
            f"target {target.model}: lm_head has {head.lm_head.shape[0]} rows but the run recorded "
            f"vocab_size {target.vocab_size}; the model dir changed since the rollout started"
        )
    vocab = vocab_from_record(vocab_record, head.lm_head.shape[0])
    cfg = draft_config(head, target, vocab, config.draft_overrides)
    torch.manual_seed(config.seed)
    model = Eagle3Draft(cfg, embed_tokens=head.embed_tokens.float(), d2t=vocab.d2t, t2d=vocab.t2d)
    if config.draft_init == "target":
        init_from_target(model, head, target.model, target.aux_layers)
    return model, head


def schedule_total(meta: RunMeta, tasks: TaskQueue, queue: RefQueue, options: TrainOptions) -> tuple[int, str]:
    """The learning-rate schedule's total and its unit (schedule.py): --max-steps, else the samples the run
    will bring (its prompt tasks, or its refs once the stream has ended) times --epochs; 0 when open-ended."""
    if options.max_steps:
        return options.max_steps, "steps"
    known = sum(tasks.counts().values())
    if not known and meta.end_of_stream():
        known = sum(queue.counts().values())
    return known * options.epochs, "samples"


def check_out_dir(out: Path) -> Path:
    out = out.expanduser().resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{id(out)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"output dir {out} is not writable ({e.strerror}); pass --out a writable dir") from None
    return out


def check_draft_matches(state: dict, model: Eagle3Draft, checkpoint: str) -> None:
    if state.get("draft_config") != asdict(model.cfg):
        raise ConfigMismatch(
            f"checkpoint {checkpoint} holds a draft of shape {state.get('draft_config')}, now {asdict(model.cfg)}; "
            "use the original --draft-config or start a new run with another --db"
        )
