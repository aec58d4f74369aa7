"""Trainer settings. `TrainConfig` shapes the result and is recorded in the run (a restart must match);
`TrainOptions` only says where and how long to run, and may change between restarts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from dataflow.train.schedule import DECAYS

DTYPES = ("auto", "fp32", "bf16")

DRAFT_INITS = ("random", "target")

TRACKERS = ("tensorboard", "wandb", "none")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    lr: float = 1e-4
    """Peak AdamW learning rate."""
    warmup: float = 0.03
    """Linear warmup over this fraction of the known total (see schedule.py)."""
    warmup_steps: int = 50
    """Linear warmup length in steps when the stream is open-ended (no known total)."""
    decay: str = "cosine"
    """cosine, linear or none: from lr down to min_lr_ratio * lr at the end of the known total."""
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    """Max global gradient norm."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    batch_tokens: int = 4096
    """Token budget of one micro-batch, padding included (a longer sample goes alone)."""
    ttt_length: int = 7
    """Unrolled training-time-test steps."""
    dtype: str = "auto"
    """Compute dtype of the forward/backward: bf16 (bf16 weights and activations over fp32 master weights and
    AdamW state), fp32, or auto (bf16 where the device has fast bf16 matmuls, else fp32)."""
    seed: int = 0
    draft_init: str = "random"
    """The draft's starting weights: random (seeded), or target (the target's last layer and head;
    draft_init.py)."""
    draft_overrides: dict = field(default_factory=dict)
    """--draft-config JSON: DraftConfig fields that differ from the target's shape."""
    export_embed_tokens: bool = False
    """Also write embed_tokens into the export (SGLang/vLLM otherwise share the target's)."""
    validation_share: float = 0.0
    """Share of the prompts (by hash: all their replies and epochs) never trained on; the draft's accuracies
    on them are measured while it trains (validation.py). 0: none held out."""

    def __post_init__(self):
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError("--lr and the grad clip must be positive")
        for name in ("grad_accum", "batch_tokens", "ttt_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or not 0 <= self.warmup < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("--warmup-steps must be >= 0, --warmup in [0, 1) and --min-lr-ratio in [0, 1]")
        if self.decay not in DECAYS:
            raise ValueError(f"--decay {self.decay!r}: pick one of {', '.join(DECAYS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: pick one of {', '.join(DTYPES)}")
        if self.draft_init not in DRAFT_INITS:
            raise ValueError(f"--draft-init {self.draft_init!r}: pick one of {', '.join(DRAFT_INITS)}")
        if not 0 <= self.validation_share < 1:
            raise ValueError(f"--validation-share must be in [0, 1), got {self.validation_share}")

    def recorded(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """How this trainer process runs: where it writes, how long it runs, what it shows. Not recorded in the
    run, so a restart may change them."""

    out: Path
    """Checkpoint, metrics and TensorBoard dir."""
    max_steps: int = 0
    """Pause after this many optimiser steps: a stop, not the end of the run (0: when the stream drains)."""
    epochs: int = 1
    """Passes over a files-store run: epochs after the first replay the retained features."""
    save_every: int = 500
    """Steps between checkpoints (one more at the end)."""
    keep: int = 2
    """Step checkpoints kept on disk."""
    exit_when_idle: float = 0.0
    """Give up after this many seconds with no data and no live rollout (0: wait forever)."""
    wait_for_rollout: float = 0.0
    """Give up (exit 2) if no rollout has prepared the run after this many seconds (0: wait until stopped)."""
    lease_ttl: float = 60.0
    """Seconds a leased ref stays ours without an extension."""
    fill_wait: float = 2.0
    """Seconds to wait for more refs to fill a step while the stream is open (then train on what there is)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto."""
    log_every: int = 10
    validate_every: int = 50
    """Steps between measurements of the held-out accuracies (--validation-share); one more at the end."""
    validation_tokens: int = 65536
    """Tokens of held-out samples kept in memory (per rank) to measure on."""
    compile: bool = True
    """torch.compile one TTT step (midlayer + norm, forward and backward) and the loss's softmax/gradient pass;
    the first step pays the compile (~30 CPU-s on 2 cores); a failure falls back to eager with one warning."""
    progress: bool = True
    """Rich progress display on stderr."""
    report_to: str = "tensorboard"
    """Trackers beside metrics.jsonl, comma-separated: tensorboard, wandb; or none."""

    def __post_init__(self):
        unknown = set(self.report_to.split(",")) - set(TRACKERS)
        if unknown:
            raise ValueError(f"--report-to {self.report_to}: unknown {sorted(unknown)}; pass any of {', '.join(TRACKERS)}")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.max_steps < 0 or self.save_every < 1 or self.keep < 1 or self.log_every < 1:
            raise ValueError("--max-steps must be >= 0; --save-every, --keep, --log-every >= 1")
        if self.validate_every < 1 or self.validation_tokens < 1:
            raise ValueError("--validate-every and --validation-tokens must be >= 1")
        if self.wait_for_rollout < 0:
            raise ValueError(f"--wait-for-rollout must be >= 0, got {self.wait_for_rollout}")
        if self.exit_when_idle < 0 or self.lease_ttl <= 0 or self.fill_wait < 0:
            raise ValueError("--exit-when-idle and --fill-wait must be >= 0, --lease-ttl > 0")
