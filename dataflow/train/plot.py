"""`dataflow plot RUN_DIR`: loss, acc_k and tau-hat curves from metrics.jsonl as one PNG."""

from __future__ import annotations

import json
from pathlib import Path

from dataflow.errors import InputError
from dataflow.train.metrics import METRICS_FILE


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise InputError(f"{path} not found; pass the trainer's --out dir (it holds {METRICS_FILE})")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise InputError(f"{path} has no rows yet; train for at least --log-every steps first")
    return rows


def plot_metrics(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    everything = read_metrics(run_dir)
    rows = [r for r in everything if "loss" in r]
    held_out = [r for r in everything if "val_tau_hat" in r]  # --validation-share's own rows
    steps = [r["step"] for r in rows]
    last = rows[-1] if rows else {}
    acc_names = sorted((n for n in last if n.startswith("acc_")), key=lambda n: int(n.split("_")[1]))
    fig, (loss_ax, acc_ax, tau_ax) = plt.subplots(1, 3, figsize=(16, 4))
    loss_ax.plot(steps, [r["loss"] for r in rows], label="loss")
    loss_ax.set(xlabel="step", ylabel="loss", title="TTT loss (weighted)")
    for name in acc_names:
        acc_ax.plot(steps, [r.get(name, 0.0) for r in rows], label=name)
    acc_ax.set(xlabel="step", ylabel="top-1 accuracy", title="acc_k", ylim=(0, 1))
    acc_ax.legend(fontsize="small")
    tau_ax.plot(steps, [r.get("tau_hat", 1.0) for r in rows], label="trained samples")
    if held_out:
        tau_ax.plot([r["step"] for r in held_out], [r["val_tau_hat"] for r in held_out], label="held-out prompts")
        tau_ax.legend(fontsize="small")
    tau_ax.set(xlabel="step", ylabel="tokens per verification", title="expected acceptance tau-hat = 1 + sum prod acc")
    fig.tight_layout()
    out = Path(out) if out is not None else Path(run_dir) / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
