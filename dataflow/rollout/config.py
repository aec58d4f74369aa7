"""Settings of one rollout process. The keys that must not change between restarts of a run are
recorded with RunMeta.record_or_check_config("rollout", config.run_identity(...))."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dataflow.rollout.data import DEFAULT_HELD_OUT


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    dataset: Path | None = None
    """jsonl of conversations; None = the bundled default dataset."""
    on_bad_row: Literal["skip", "fail"] = "fail"
    """What to do with malformed dataset rows."""
    num_samples: int | None = None
    """Use only the first N rows of the dataset (after the held-out rows are set aside)."""
    held_out: int = DEFAULT_HELD_OUT
    """N conversation rows spread through the dataset are never trained on: `dataflow eval` prompts with them."""
    self_prompts: int = 0
    """Prompts the target writes itself from its bare user header (Magpie), added to the dataset's rows."""
    prompt_temperature: float = 0.8
    """Sampling temperature of the self-written prompts (SmolLM2-135M: 1.0 writes many incoherent ones)."""
    samples_per_prompt: int = 1
    """Sampled replies per prompt (each its own sample); > 1 needs --regenerate and --temperature > 0."""
    greedy_first_reply: bool = False
    """With samples_per_prompt > 1: each prompt's first reply is the target's greedy one (what it says when served
    greedily), the others sampled at --temperature."""
    epochs: int = 1
    """Passes over the dataset (one target forward per sample per epoch)."""
    seed: int = 0
    """Shuffles each epoch's order and seeds sampled regeneration."""
    max_length: int = 2048
    """Tokens per sample; longer samples are truncated with their loss mask."""
    train_only_last_turn: bool = False
    """Mask only the last assistant reply."""
    draft_vocab_size: int | None = None
    """Draft vocabulary size; None = min(32000, target vocab)."""
    regenerate: bool = False
    """Let the target write the assistant replies first (kept across restarts)."""
    vocab_warmup: int = 256
    """With regenerate: the first N samples are regenerated before any feature is published, and the draft
    vocabulary is counted from those replies (the target's own), not the dataset's."""
    max_new_tokens: int = 256
    """Reply length limit for --regenerate."""
    temperature: float = 0.0
    """0 = greedy regeneration; > 0 samples."""
    token_budget: int = 4096
    """Padded tokens per forward batch."""
    tasks_per_lease: int = 32
    """Prompt tasks leased at once (length-sorted into batches together)."""
    lease_ttl: float = 60.0
    """Seconds a leased task stays ours without an extension (a killed rollout's tasks return after it)."""
    store: Literal["shm", "files"] = "shm"
    """Feature store of the data plane."""
    store_dir: Path | None = None
    """Directory of the files store."""
    max_inflight_bytes: int = 1 << 30
    """Byte watermark: the rollout waits while this many feature bytes are not yet consumed."""
    wait_for_trainer: bool = False
    """After the dataset is done, stay until the trainer finishes and regenerate prompts whose features were
    lost (a trainer restart re-queues them when their bytes were already freed). `dataflow run` sets it."""
    producer_id: str | None = None
    """Names this rollout's feature arena, leases and heartbeat; None = the lowest free "r<i>" of the run.
    A restarted rollout with the same id re-attaches its arena."""

    @property
    def max_request_tokens(self) -> int:
        """What one vLLM request holds: a sample (max_length + the one token it generates) or a regeneration
        prompt and its reply."""
        return self.max_length + self.max_new_tokens

    def __post_init__(self):
        positive = ("epochs", "max_length", "max_new_tokens", "token_budget", "tasks_per_lease", "max_inflight_bytes",
                    "samples_per_prompt", "vocab_warmup")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise ValueError(f"draft_vocab_size must be >= 1, got {self.draft_vocab_size}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.held_out < 0 or self.self_prompts < 0:
            raise ValueError(f"held_out and self_prompts must be >= 0, got {self.held_out}, {self.self_prompts}")
        if self.prompt_temperature <= 0:
            raise ValueError(f"prompt_temperature must be > 0, got {self.prompt_temperature}")
        if self.self_prompts and not self.regenerate:
            raise ValueError("self_prompts needs regenerate (the target writes the replies to its own prompts)")
        if self.samples_per_prompt > 1 and not (self.regenerate and self.temperature > 0):
            raise ValueError("samples_per_prompt > 1 needs regenerate and temperature > 0 (else the copies are equal)")
        if self.greedy_first_reply and self.samples_per_prompt < 2:
            raise ValueError("greedy_first_reply needs samples_per_prompt > 1 (for greedy replies only: temperature 0)")
        if self.lease_ttl <= 0:
            raise ValueError(f"lease_ttl must be > 0, got {self.lease_ttl}")
        if self.on_bad_row not in ("skip", "fail"):
            raise ValueError(f"on_bad_row must be 'skip' or 'fail', got {self.on_bad_row!r}")
        if self.store not in ("shm", "files"):
            raise ValueError(f"store must be 'shm' or 'files', got {self.store!r}")
        if self.store == "files" and self.store_dir is None:  # said before the model loads, not after the vocab pass
            raise ValueError("--store files needs --store-dir DIR (where the sample files go)")
