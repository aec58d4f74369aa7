"""A tiny target and its real features, for the trainer's tests and demos (no tokenizer needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from dataflow import testing
from dataflow.records import TargetRecord, VocabRecord, write_target, write_vocab_once
from dataflow.rollout.engines.hf import default_aux_layers as aux_layers


def build_tiny_target(out_dir: Path, *, vocab_size: int = 320, hidden_size: int = 64, num_layers: int = 4,
                      tie_word_embeddings: bool = False, seed: int = 0) -> Path:
    """A tiny target without tokenizer and with a confident teacher head."""
    return testing.build_tiny_target(out_dir, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                                     tie_word_embeddings=tie_word_embeddings, head_scale=30.0, seed=seed)


@torch.no_grad()
def tiny_features(model_dir: Path, lengths: list[int], *, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Per-sample EAGLE3 features of random token sequences (the second half is the 'assistant' part)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n = model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for length in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=gen)
        out = model.model(input_ids=ids, output_hidden_states=True)
        samples.append(
            {
                "input_ids": ids[0],
                "loss_mask": torch.arange(length) >= length // 2,
                "aux_hidden": torch.cat([out.hidden_states[i] for i in aux_layers(n)], dim=-1)[0],
                "target_hidden": out.last_hidden_state[0],
            }
        )
    return samples


def target_record(model_dir: Path, max_length: int = 512) -> TargetRecord:
    """The run's target record for a tiny target."""
    import json

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    return TargetRecord(model=str(Path(model_dir).resolve()), hidden_size=cfg["hidden_size"],
                        vocab_size=cfg["vocab_size"], num_hidden_layers=n, aux_layers=aux_layers(n), dtype="float32",
                        max_length=max_length)


def draft_vocab_for(
    samples: list[dict[str, torch.Tensor]], lm_head: torch.Tensor, draft_vocab_size: int
) -> VocabRecord:
    """A vocab record holding every token the target predicts on `samples`, topped up with low ids."""
    predicted = {int(t) for s in samples for t in (s["target_hidden"] @ lm_head.T).argmax(-1)}
    filler = (t for t in range(lm_head.shape[0]) if t not in predicted)
    while len(predicted) < draft_vocab_size:
        predicted.add(next(filler))
    return VocabRecord.from_target_ids(sorted(predicted)[:draft_vocab_size])


def seed_run(db: Path, model_dir: Path, samples: list[dict[str, torch.Tensor]], *, draft_vocab_size: int,
             store: str = "files", store_dir: Path | None = None, end_of_stream: bool = True,
             vocab_samples: list[dict[str, torch.Tensor]] | None = None) -> list[str]:
    """A run as a finished rollout leaves it: target + vocab records, one ref per sample, end-of-stream.
    The draft vocabulary is counted on `vocab_samples` (default: `samples`)."""
    from dataflow.control.db import connect
    from dataflow.control.meta import RunMeta
    from dataflow.control.queue import RefItem, RefQueue
    from dataflow.train.target import load_target_head
    from dataflow.transport import open_writer

    conn = connect(db)
    meta = RunMeta(conn)
    write_target(meta, target_record(model_dir))
    lm_head = load_target_head(model_dir).lm_head
    write_vocab_once(meta, draft_vocab_for(vocab_samples or samples, lm_head, draft_vocab_size))
    writer = open_writer(conn, store=store, producer_id="rollout-0", max_inflight_bytes=64 << 20, store_dir=store_dir)
    keys = [str(i) for i in range(len(samples))]
    for key, sample in zip(keys, samples):
        handle, nbytes = writer.write(key, sample)
        RefQueue(conn).put(RefItem(key=key, handle=handle, nbytes=nbytes, store=handle["store"]))
    writer.close()
    if end_of_stream:
        meta.set_end_of_stream()
    conn.close()
    return keys
