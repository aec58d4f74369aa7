"""The learning-rate schedule: linear warmup, then cosine (or linear) decay to a floor over the known total.

The total is known when the run says how much will come: `--max-steps` (counted in optimiser steps), or
the rollout's prompt tasks (`--num-samples` x its `--epochs`) times the trainer's `--epochs` (counted in
samples, so that steps of uneven size move the schedule by what they trained). It is fixed at the first step
and kept in the checkpoint, so a resumed run continues the same curve.

Open-ended stream (no task list and no end of stream yet, and no --max-steps): warmup over `warmup_steps`
optimiser steps, then the peak learning rate to the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DECAYS = ("cosine", "linear", "none")


@dataclass
class LrSchedule:
    peak: float
    warmup: float  # fraction of the total
    warmup_steps: int  # open-ended stream only
    decay: str
    min_ratio: float
    total: int = 0  # 0: open-ended
    unit: str = "samples"  # or "steps"

    def factor(self, *, step: int, samples: int) -> float:
        """Multiplier of the peak lr for the optimiser step after `step` steps and `samples` samples."""
        if self.total <= 0:
            return min((step + 1) / self.warmup_steps, 1.0) if self.warmup_steps else 1.0
        done = (step if self.unit == "steps" else samples) / self.total
        if done < self.warmup:
            return max(done / self.warmup, 1.0 / self.total)  # never 0: the first step moves the draft
        progress = min((done - self.warmup) / max(1.0 - self.warmup, 1e-9), 1.0)
        if self.decay == "none":
            return 1.0
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1.0 - progress
        return self.min_ratio + (1.0 - self.min_ratio) * shape

    def lr(self, *, step: int, samples: int) -> float:
        return self.peak * self.factor(step=step, samples=samples)

    def state_dict(self) -> dict:
        return {"total": self.total, "unit": self.unit}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.unit = int(state["total"]), str(state["unit"])
