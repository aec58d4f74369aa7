"""The learning curve of a training run: expected acceptance length τ̂ against trained tokens, as PNG + JSON.

τ̂ (chain drafting with K guesses) = 1 + Σ_{k<K} Π_{i≤k} acc_i, from the per-step accuracies the trainer
logs in OUT/metrics.jsonl (its own `tau_hat` column where it has one). Trained tokens are the trainer's
`trained_tokens` column where it has one, else summed from each row's tokens/s and steps/s. Measured τ
points (`dataflow eval --json` outputs, each with the trained tokens of its checkpoint) are drawn on top.

    python scripts/learning_curve.py OUT --k 5 --eval final:eval.json --out curve
    # -> curve.png, curve.json; prints one JSON object last (the final point)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from dataflow.train.plot import read_metrics


def tau_hat(row: dict, k: int) -> float | None:
    if "tau_hat" in row:
        return row["tau_hat"]
    accs = [row.get(f"acc_{i}") for i in range(k)]
    if any(a is None for a in accs):
        return None
    return 1.0 + sum(math.prod(accs[: i + 1]) for i in range(k))


def curve(rows: list[dict], k: int) -> tuple[list[dict], list[dict]]:
    """(τ̂ on the trained samples, τ̂ on held-out prompts (--validation-share)) against trained tokens."""
    points, held_out, tokens, last_step = [], [], 0.0, 0
    for row in rows:
        if "val_tau_hat" in row:  # a held-out measurement: its own row, no throughput figures
            held_out.append({"step": row["step"], "trained_tokens": round(tokens),
                             "tau_hat": round(row["val_tau_hat"], 4)})
            continue
        if "trained_tokens" in row:
            tokens = row["trained_tokens"]
        elif row.get("steps_per_s"):
            tokens += row["tokens_per_s"] * (row["step"] - last_step) / row["steps_per_s"]
        last_step = row["step"]
        value = tau_hat(row, k)
        if value is not None:
            points.append({"step": row["step"], "trained_tokens": round(tokens), "tau_hat": round(value, 4)})
    return points, held_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="The trainer's --out dir.")
    parser.add_argument("--k", type=int, default=5, help="Draft tokens per verification step.")
    parser.add_argument("--eval", action="append", default=[], metavar="TOKENS:EVAL_JSON",
                        help="A measured τ (dataflow eval --json) at TOKENS trained tokens ('final': the "
                        "last logged); repeatable.")
    parser.add_argument("--out", type=Path, required=True, help="Path prefix of the PNG and JSON.")
    args = parser.parse_args()

    points, held_out = curve(read_metrics(args.run_dir), args.k)
    measured = []
    for spec in args.eval:
        tokens, path = spec.split(":", 1)
        result = json.loads(Path(path).read_text())
        at = points[-1]["trained_tokens"] if tokens == "final" and points else int(float(tokens))
        measured.append({"trained_tokens": at, "tau": result["tau"], "k": result["num_draft_tokens"],
                         "prompts": result["prompts"], "source": path})
    Path(f"{args.out}.json").write_text(json.dumps({"k": args.k, "tau_hat": points, "held_out_tau_hat": held_out,
                                                    "tau": measured}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p["trained_tokens"] for p in points], [p["tau_hat"] for p in points], ".-",
            label=f"τ̂ (train, K={args.k})")
    if held_out:
        ax.plot([p["trained_tokens"] for p in held_out], [p["tau_hat"] for p in held_out], ".-",
                label="τ̂ (held-out prompts, --validation-share)")
    if measured:
        ax.plot([m["trained_tokens"] for m in measured], [m["tau"] for m in measured], "o",
                label="τ measured (held-out prompts)")
    ax.set(xlabel="trained tokens", ylabel="acceptance length", title=f"learning curve: {args.run_dir}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=100)
    plt.close(fig)
    final = points[-1] if points else {}
    print(json.dumps({**final, "held_out_tau_hat": held_out[-1]["tau_hat"] if held_out else None,
                      "tau": measured[-1]["tau"] if measured else None, "png": f"{args.out}.png"}))


if __name__ == "__main__":
    main()
