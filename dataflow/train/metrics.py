"""What the trainer reports: metrics.jsonl + TensorBoard events in the output dir, and a live status line
on a terminal or plain log lines without one."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dataflow.errors import InputError

METRICS_FILE = "metrics.jsonl"
log = logging.getLogger(__name__)


@dataclass
class Window:
    """Sums since the last log line (per TTT step k: loss sum, correct, count)."""

    steps: int = 0
    samples: int = 0
    tokens: int = 0
    loss: float = 0.0
    loss_sum: list[float] = field(default_factory=list)
    correct: list[float] = field(default_factory=list)
    count: list[float] = field(default_factory=list)
    data_wait_s: float = 0.0
    started: float = field(default_factory=time.monotonic)

    def add(self, *, loss: float, loss_sum: list[float], correct: list[float], count: list[float],
            samples: int, tokens: int) -> None:
        if not self.loss_sum:
            k = len(loss_sum)
            self.loss_sum, self.correct, self.count = [0.0] * k, [0.0] * k, [0.0] * k
        for i in range(len(loss_sum)):
            self.loss_sum[i] += loss_sum[i]
            self.correct[i] += correct[i]
            self.count[i] += count[i]
        self.steps, self.samples, self.tokens = self.steps + 1, self.samples + samples, self.tokens + tokens
        self.loss += loss

    def summary(self, step: int, lr: float) -> dict:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        row = {
            "step": step,
            "loss": self.loss / max(self.steps, 1),
            "lr": lr,
            "steps_per_s": self.steps / elapsed,
            "samples_per_s": self.samples / elapsed,
            "tokens_per_s": self.tokens / elapsed,
            "data_wait_pct": 100.0 * self.data_wait_s / elapsed,
        }
        for k in range(len(self.loss_sum)):
            row[f"ploss_{k}"] = self.loss_sum[k] / max(self.count[k], 1.0)
            row[f"acc_{k}"] = self.correct[k] / max(self.count[k], 1.0)
        if self.loss_sum:
            row["tau_hat"] = expected_acceptance([row[f"acc_{k}"] for k in range(len(self.loss_sum))])
        return row


def expected_acceptance(accs: list[float]) -> float:
    """tau-hat = 1 + sum_k prod_{i<=k} acc_i: the expected tokens per verification step if the draft's step-k
    guess is accepted with probability acc_k given that the earlier ones were (a chain draft of len(accs))."""
    tau, chain = 1.0, 1.0
    for acc in accs:
        chain *= acc
        tau += chain
    return tau


class MetricsLog:
    """Rank 0 only. On resume, rows past the checkpoint's step (from the killed run) are dropped."""

    def __init__(self, out: Path, *, resume_step: int, report_to: str = "tensorboard", run_id: str = ""):
        self.path = out / METRICS_FILE
        trackers = set(report_to.split(","))
        self._wandb = start_wandb(out, run_id) if "wandb" in trackers else None  # first: it may refuse
        self._truncate_after(resume_step)
        self._file = open(self.path, "a")
        self._tb = None
        if "tensorboard" in trackers:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        if self.path.exists():
            rows = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if json.loads(r).get("step", 0) <= step]
            self.path.write_text("".join(r + "\n" for r in kept))

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in row.items():
                if name != "step":
                    self._tb.add_scalar(f"train/{name}", value, row["step"])
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def start_wandb(out: Path, run_id: str):
    """A wandb run named after the dataflow run, resumed by a restarted trainer (same id)."""
    try:
        import wandb
    except ImportError:
        raise InputError("--report-to wandb: wandb is not installed; `pip install wandb`, or pass --report-to "
                         "tensorboard") from None
    return wandb.init(dir=str(out), id=f"dataflow-{run_id[:12]}", name=out.name, resume="allow")


class StatusLine:
    """One live line on stderr (rich) when `live` and a terminal; otherwise (nohup, SLURM, Kubernetes,
    `dataflow run`'s log files) every step row and message is a plain line through `logging`. Rank 0 only
    (`speak`)."""

    def __init__(self, *, live: bool, speak: bool):
        self._live, self._speak = None, speak
        if live and speak and sys.stderr.isatty():
            from rich.console import Console
            from rich.live import Live

            self._live = Live("", console=Console(stderr=True), refresh_per_second=4, transient=False)
            self._live.start()

    def show(self, text: str) -> None:
        """A passing state (e.g. what it waits for): on the live line only."""
        if self._live is not None:
            self._live.update(text)

    def step(self, text: str) -> None:
        """A logged step's figures: the live line, or a log line without one."""
        if self._live is not None:
            self._live.update(text)
        elif self._speak:
            log.info(text)

    def print(self, text: str) -> None:
        if not self._speak:
            return
        if self._live is None:
            log.info(text)
        elif log.isEnabledFor(logging.INFO):  # --quiet holds on a terminal too
            self._live.console.print(text)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()


def describe(row: dict) -> str:
    tau = f"  tau-hat {row['tau_hat']:.2f}" if "tau_hat" in row else ""
    return (
        f"step {row['step']}  loss {row['loss']:.4f}  acc_0 {row.get('acc_0', 0.0):.3f}{tau}  "
        f"{row['tokens_per_s']:.0f} tokens/s  {row['samples_per_s']:.1f} samples/s  "
        f"data-wait {row['data_wait_pct']:.0f}%  lr {row['lr']:.2e}"
    )
