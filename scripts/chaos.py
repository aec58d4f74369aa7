"""Chaos: a real rollout + trainer pair on a tiny target; SIGKILL either at random moments and restart it.

At the end it checks what DESIGN promises: every sample trained exactly once relative to the final
checkpoint (the checkpoint's cumulative sample count equals the dataset, every ref TRAINED once), no dead
refs, nothing of the run left in /dev/shm, and a loss curve that kept going down across restarts.
Prints one JSON object last.

    python scripts/chaos.py --kills 10 --samples 96
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefQueue
from dataflow.testing import build_tiny_target
from dataflow.train.checkpoint import read_training_state
from dataflow.transport.gc import run_prefix
from dataflow.transport.segment import SHM_DIR

FINISH_TIMEOUT_S = 600


def commands(work: Path, target: Path, samples: int, seed: int) -> dict[str, list[str]]:
    db = work / "run.sqlite"
    common = ["--db", str(db), "--lease-ttl", "3", "--no-progress"]
    return {
        "rollout": [
            sys.executable, "-m", "dataflow", "rollout", *common, "--target-model", str(target),
            "--num-samples", str(samples), "--max-length", "96", "--threads", "1", "--tasks-per-lease", "4",
            "--token-budget", "384", "--max-inflight-bytes", str(4 << 20), "--draft-vocab-size", "512",
            "--wait-for-trainer",
        ],
        "train": [
            sys.executable, "-m", "dataflow", "train", *common, "--out", str(work / "out"), "--save-every", "2",
            "--batch-tokens", "384", "--ttt-length", "3", "--lr", "1e-3", "--warmup-steps", "2", "--log-every", "1",
            "--seed", str(seed), "--exit-when-idle", "120",
        ],
    }


def start(role: str, cmd: list[str], work: Path) -> subprocess.Popen:
    log = open(work / f"{role}.log", "ab")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def run_with_kills(cmds: dict[str, list[str]], work: Path, kills: int, rng: random.Random) -> dict[str, int]:
    procs = {role: start(role, cmd, work) for role, cmd in cmds.items()}
    killed = {"rollout": 0, "train": 0}
    for _ in range(kills):
        time.sleep(rng.uniform(0.5, 2.5))
        running = [role for role, p in procs.items() if p.poll() is None]
        if not running:
            break
        victim = rng.choice(running)
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait()
        killed[victim] += 1
        procs[victim] = start(victim, cmds[victim], work)
    deadline = time.monotonic() + FINISH_TIMEOUT_S
    for role, p in procs.items():
        code = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        if code != 0:
            tail = (work / f"{role}.log").read_text(errors="replace")[-2000:]
            raise SystemExit(f"chaos: {role} exited {code} after the kills; its log ends with:\n{tail}")
    return killed


def verify(work: Path, samples: int) -> dict:
    conn = connect(work / "run.sqlite")
    counts, meta = RefQueue(conn).counts(), RunMeta(conn)
    last = meta.last_checkpoint()
    state = read_training_state(last.path) if last else {"samples": 0, "step": 0}
    recorded = conn.execute("SELECT coalesce(sum(num_refs), 0) FROM checkpoints").fetchone()[0]
    leaked = sum(p.stat().st_size for p in Path(SHM_DIR).glob(f"{run_prefix(meta.run_id)}*"))
    rows = [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {
        "samples": samples,
        "trained_refs": counts["trained"],
        "lost": samples - counts["trained"],
        # The final model's cumulative sample count vs the dataset: anything above means a sample was
        # trained twice into the final weights; the checkpoints' recorded refs must agree.
        "trained_twice": max(0, state["samples"] - samples) + max(0, recorded - counts["trained"]),
        "final_model_samples": state["samples"],
        "dead": counts["dead"],
        "leaked_bytes": leaked,
        "final_step": state["step"],
        "first_loss": round(losses[0], 4) if losses else None,
        "last_loss": round(losses[-1], 4) if losses else None,
        "loss_finite": all(math.isfinite(x) for x in losses),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs to deliver (M)")
    parser.add_argument("--samples", type=int, default=96, help="dataset rows to produce and train on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="keep the run here instead of a temp dir")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="dataflow-chaos-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        target = build_tiny_target(work / "target", hidden_size=64, num_layers=4, seed=args.seed)
        start_time = time.monotonic()
        killed = run_with_kills(commands(work, target, args.samples, args.seed), work, args.kills,
                                random.Random(args.seed))
        result = {"trials": args.kills, "kills": sum(killed.values()), "kills_rollout": killed["rollout"],
                  "kills_train": killed["train"], **verify(work, args.samples),
                  "wall_s": round(time.monotonic() - start_time, 1)}
    print(json.dumps(result))
    ok = result["lost"] == 0 and result["trained_twice"] == 0 and result["dead"] == 0 and not result["leaked_bytes"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
