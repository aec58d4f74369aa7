"""Compare training settings on a finished run's stored features, on prompts the draft never trained on.

A files-store run (`--store files`) keeps every sample's features, so the trainer's knobs can be compared
without running the target again: this trains a fresh draft with the trainer's own step (TrainStep, bf16,
compiled) on the run's samples, holds out every sample of every tenth prompt by hash (all replies of a
held-out prompt, so nothing of it is trained on), and after each epoch prints the held-out per-step
accuracies and τ̂ = 1 + Σ_k Π_{i≤k} acc_i as one JSON line; the last line is the final epoch's.

    .venv/bin/python scripts/tune_on_features.py RUN_DIR/run.sqlite --epochs 4 --lr 1e-3
    .venv/bin/python scripts/tune_on_features.py RUN_DIR/run.sqlite --first-reply-only   # one reply per prompt

The target dir the run recorded must still exist (the trainer reads its lm_head and embeddings); `--target`
points at another copy of the same model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sqlite3
import time
import zlib
from pathlib import Path

import torch

from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefQueue
from dataflow.keys import EPOCH_MARK, prompt_of
from dataflow.records import read_target, read_vocab
from dataflow.train.build import build_draft
from dataflow.train.config import DRAFT_INITS, TrainConfig
from dataflow.train.loss import loss_tokens
from dataflow.train.metrics import expected_acceptance
from dataflow.train.source import LeasedSample, collate
from dataflow.train.step import TrainStep, keep_freed_memory
from dataflow.train.validation import accuracy_sums, packed
from dataflow.transport import open_reader


def held_out(key: str, every: int) -> bool:
    """Every `every`-th prompt by hash, with all its replies."""
    return zlib.crc32(prompt_of(key).encode()) % every == 0


def load_samples(conn: sqlite3.Connection, every: int,
                 first_reply_only: bool) -> tuple[list[LeasedSample], list[LeasedSample]]:
    """(trained, held out) first-epoch samples of the run, features copied out of the store."""
    reader = open_reader(conn)
    trained, held = [], []
    for item in RefQueue(conn).consumed_items(without=EPOCH_MARK):
        if first_reply_only and prompt_of(item.key) != item.key:
            continue
        features = {name: t.clone() for name, t in reader.open(item.handle).items()}
        (held if held_out(item.key, every) else trained).append(LeasedSample(lease=None, features=features))
    reader.close()
    return trained, held


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("db", type=Path, help="the run's database (its features in a files store)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--ttt-length", type=int, default=5)
    p.add_argument("--held-out-every", type=int, default=10, help="hold out every N-th prompt (by hash)")
    p.add_argument("--first-reply-only", action="store_true", help="train on each prompt's first reply only")
    p.add_argument("--target", help="the run's target model dir, if it moved")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draft-init", choices=DRAFT_INITS, default="random", help="the draft's starting weights")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()

    conn = connect(args.db)
    meta = RunMeta(conn)
    target, vocab = read_target(meta), read_vocab(meta)
    if target is None or vocab is None:
        raise SystemExit(f"{args.db}: no target or vocabulary recorded; is it a rollout's run database?")
    if args.target:
        target = dataclasses.replace(target, model=args.target)
    config = TrainConfig(lr=args.lr, ttt_length=args.ttt_length, batch_tokens=args.batch_tokens, dtype="bf16",
                         warmup_steps=20, seed=args.seed, draft_init=args.draft_init)
    model, head = build_draft(target, vocab, config)
    step = TrainStep(model, head.lm_head, config, device=torch.device("cpu"), compile=True)
    trained, held = load_samples(conn, args.held_out_every, args.first_reply_only)
    if not trained or not held:
        raise SystemExit(f"{args.db}: {len(trained)} samples to train, {len(held)} held out; need some of each")
    step.schedule.total, step.schedule.unit = args.epochs * len(trained), "samples"
    held_batches = packed(held, args.batch_tokens)
    print(json.dumps({"trained_samples": len(trained), "held_out_samples": len(held)}), flush=True)

    rng, steps, samples, started = random.Random(args.seed), 0, 0, time.monotonic()
    for epoch in range(1, args.epochs + 1):
        order = trained[:]
        rng.shuffle(order)
        for batch in packed(order, args.batch_tokens):
            mb = collate(batch, torch.device("cpu"), step.dtype)
            step.accumulate(mb, max(float(loss_tokens(mb.loss_mask)), 1.0))
            step.update(step=steps, samples=samples)
            steps, samples = steps + 1, samples + len(batch)
        correct, count = accuracy_sums(step, held_batches, args.ttt_length, torch.device("cpu"))
        accs = [c / max(n, 1.0) for c, n in zip(correct, count)]
        print(json.dumps({"epoch": epoch, "steps": steps, "lr": args.lr, "batch_tokens": args.batch_tokens,
                          "draft_init": args.draft_init, "seed": args.seed,
                          "first_reply_only": args.first_reply_only, "held_out_acc": [round(a, 3) for a in accs],
                          "held_out_tau_hat": round(expected_acceptance(accs), 3),
                          "seconds": round(time.monotonic() - started)}), flush=True)


if __name__ == "__main__":
    main()
