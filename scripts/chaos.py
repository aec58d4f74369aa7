"""Chaos: real rollout + trainer processes on a tiny target, attacked the ways a run meets in the wild.

Scenarios (each its own run, checked on its own):
  random-kills          SIGKILL either process at random moments (--kills of them) and restart it
  second-trainer        a second trainer started mid-run on the same database (it must be refused)
  max-steps             the trainer stops at --max-steps twice and is started again: a pause, not the end
  regenerate-short-ttl  two rollouts with --regenerate and a 1 s task lease, one of them killed once
  clock-jump            processes restarted with their wall clock ±2×TTL off (DATAFLOW_CLOCK_OFFSET_S)
  checkpoint-kills      the trainer SIGKILLed while it writes a checkpoint or before it records one

After each, it checks what DESIGN promises: every sample trained exactly once relative to the final
checkpoint (its cumulative sample count equals the dataset, every ref TRAINED once), no dead refs or
tasks, nothing of the run left in /dev/shm, no half-written checkpoint dirs, a second trainer refused (exit 2),
finite losses.
Prints one JSON object last (totals, then per scenario); exits non-zero on any violation.

    python scripts/chaos.py --kills 50
    python scripts/chaos.py --kills 3 --samples 24 --scenarios random-kills
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
from dataflow.control.tasks import TaskQueue
from dataflow.testing import build_tiny_target
from dataflow.train.checkpoint import read_training_state
from dataflow.transport.owner import store_name
from dataflow.transport.segment import SHM_DIR

FINISH_TIMEOUT_S = 600
TTL = 3.0  # --lease-ttl of every process (the regenerate scenario's rollouts use 1 s)
CLOCK_OFFSET_ENV = "DATAFLOW_CLOCK_OFFSET_S"  # read by control's clock (leases, heartbeats): seconds to add


class ScenarioFailed(Exception):
    """A process of the scenario failed or hung; the message carries its log's tail."""


class Run:
    """One scenario's run: its directory, database, the commands of both roles, and the processes."""

    def __init__(self, work: Path, target: Path, samples: int, seed: int):
        self.work, self.target, self.samples, self.seed = work, target, samples, seed
        self.db = work / "run.sqlite"
        self.kills = 0
        self.notes: dict = {}
        work.mkdir(parents=True, exist_ok=True)

    def command(self, role: str, *extra: str) -> list[str]:
        common = ["--db", str(self.db), "--lease-ttl", str(TTL), "--no-progress"]
        if role == "rollout":
            args = ["--target-model", str(self.target), "--num-samples", str(self.samples), "--max-length", "96",
                    "--threads", "1", "--tasks-per-lease", "4", "--token-budget", "384",
                    "--max-inflight-bytes", str(4 << 20), "--draft-vocab-size", "512", "--wait-for-trainer"]
        else:
            args = ["--out", str(self.work / "out"), "--save-every", "2", "--batch-tokens", "384", "--ttt-length",
                    "3", "--lr", "1e-3", "--warmup-steps", "2", "--log-every", "1", "--seed", str(self.seed),
                    "--exit-when-idle", "120"]
        return [sys.executable, "-m", "dataflow", role, *common, *args, *extra]  # later options win

    def start(self, role: str, *extra: str, name: str | None = None, clock_offset: float = 0.0) -> subprocess.Popen:
        env = {**os.environ, CLOCK_OFFSET_ENV: str(clock_offset)}
        log = open(self.work / f"{name or role}.log", "ab")
        return subprocess.Popen(self.command(role, *extra), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)

    def kill(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            self.kills += 1
        proc.wait()

    def finish(self, procs: dict[str, subprocess.Popen]) -> None:
        """Every process exits 0 (the run drains), else stop with the failing one's log."""
        deadline = time.monotonic() + FINISH_TIMEOUT_S
        for name, p in procs.items():
            try:
                code = p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.stop_all(procs)
                raise ScenarioFailed(f"{name} did not finish in {FINISH_TIMEOUT_S}s") from None
            if code != 0:
                tail = (self.work / f"{name}.log").read_text(errors="replace")[-1500:]
                self.stop_all(procs)
                raise ScenarioFailed(f"{name} exited {code}; its log ends with: {tail}")

    @staticmethod
    def stop_all(procs: dict[str, subprocess.Popen]) -> None:
        for p in procs.values():
            p.kill()
            p.wait()

    def progress(self) -> int:
        """Refs acked or trained so far (0 before the database exists)."""
        if not self.db.exists():
            return 0
        conn = connect(self.db)
        try:
            counts = RefQueue(conn).counts()
            return counts["acked"] + counts["trained"]
        finally:
            conn.close()

    def wait_for_progress(self, at_least: int, procs: dict[str, subprocess.Popen], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.progress() < at_least:
            if time.monotonic() > deadline or all(p.poll() is not None for p in procs.values()):
                return
            time.sleep(0.2)

    def verify(self) -> dict:
        conn = connect(self.db)
        counts, meta = RefQueue(conn).counts(), RunMeta(conn)
        last = meta.last_checkpoint()
        state = read_training_state(last.path) if last else {"samples": 0, "step": 0}
        recorded = conn.execute("SELECT coalesce(sum(num_refs), 0) FROM checkpoints").fetchone()[0]
        leaked = sum(p.stat().st_blocks * 512 for p in SHM_DIR.glob(store_name("dataflow", meta.run_id) + "*"))
        out = self.work / "out"
        metrics = out / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
        losses = [r["loss"] for r in rows if "loss" in r]
        result = {
            "samples": self.samples,
            "kills": self.kills,
            "lost": self.samples - counts["trained"],
            # The final model's cumulative sample count vs the dataset: anything above means a sample was
            # trained twice into the final weights; the checkpoints' recorded refs must agree.
            "trained_twice": max(0, state["samples"] - self.samples) + max(0, recorded - counts["trained"]),
            "final_model_samples": state["samples"],
            "dead": counts["dead"] + TaskQueue(conn).counts()["dead"],
            "leaked_bytes": leaked,
            "stale_checkpoint_dirs": len(list(out.glob(".tmp-step-*"))) if out.exists() else 0,
            "final_step": state["step"],
            "loss_finite": all(math.isfinite(x) for x in losses),
            **self.notes,
        }
        conn.close()
        return result


def random_kills(run: Run, rng: random.Random, kills: int) -> None:
    procs = {role: run.start(role) for role in ("rollout", "train")}
    for _ in range(kills):
        time.sleep(rng.uniform(0.5, 2.5))
        running = [role for role, p in procs.items() if p.poll() is None]
        if not running:
            break
        victim = rng.choice(running)
        run.kill(procs[victim])
        procs[victim] = run.start(victim)
    run.finish(procs)


def second_trainer(run: Run, rng: random.Random, kills: int) -> None:
    procs = {role: run.start(role) for role in ("rollout", "train")}
    run.wait_for_progress(1, procs)  # the first trainer is training: the second must find it running
    intruder = run.start("train", name="train-second")
    exit_code = intruder.wait(timeout=FINISH_TIMEOUT_S)
    run.notes.update(second_trainer_exit=exit_code, unrefused_trainers=int(exit_code != 2))  # 2: refused at once
    time.sleep(rng.uniform(0.5, 2.0))
    run.kill(procs["train"])  # the holder dies: a new trainer takes over
    procs["train"] = run.start("train")
    run.finish(procs)


def max_steps(run: Run, rng: random.Random, kills: int) -> None:
    procs = {"rollout": run.start("rollout")}
    for steps in (3, 6):
        paused = run.start("train", "--max-steps", str(steps), name=f"train-max-{steps}")
        if paused.wait(timeout=FINISH_TIMEOUT_S) != 0:
            run.stop_all(procs)
            raise ScenarioFailed(f"the trainer stopping at --max-steps {steps} exited {paused.returncode}")
    run.kill(procs["rollout"])
    procs["rollout"] = run.start("rollout")
    procs["train"] = run.start("train")
    run.finish(procs)


def regenerate_short_ttl(run: Run, rng: random.Random, kills: int) -> None:
    rollout = ("--regenerate", "--max-new-tokens", "24", "--lease-ttl", "1", "--tasks-per-lease", "2")
    procs = {f"rollout-{p}": run.start("rollout", *rollout, "--producer-id", p, name=f"rollout-{p}") for p in "ab"}
    procs["train"] = run.start("train")
    time.sleep(rng.uniform(3.0, 8.0))
    run.kill(procs["rollout-a"])
    procs["rollout-a"] = run.start("rollout", *rollout, "--producer-id", "a", name="rollout-a")
    run.finish(procs)


def clock_jump(run: Run, rng: random.Random, kills: int) -> None:
    """Restarts whose clock is 2×TTL ahead of or behind the others': the leases and heartbeats they see
    were stamped by a clock that jumped."""
    procs = {role: run.start(role) for role in ("rollout", "train")}
    for role, offset in (("train", 2 * TTL), ("rollout", -2 * TTL), ("train", -2 * TTL)):
        run.wait_for_progress(run.progress() + 2, procs)
        run.kill(procs[role])
        procs[role] = run.start(role, clock_offset=offset)
    run.finish(procs)


def checkpoint_kills(run: Run, rng: random.Random, kills: int, attempts: int = 3) -> None:
    """SIGKILL the trainer while a checkpoint is half-written (.tmp-step-*) or written but not yet recorded."""
    every_step = ("--save-every", "1")
    procs = {"rollout": run.start("rollout"), "train": run.start("train", *every_step)}
    hits = 0
    for _ in range(attempts):
        if in_checkpoint_write(run, procs["train"], deadline=time.monotonic() + 120):
            run.kill(procs["train"])
            hits += 1
            procs["train"] = run.start("train", *every_step)
    run.notes["kills_in_checkpoint_writes"] = hits
    run.finish(procs)


def in_checkpoint_write(run: Run, trainer: subprocess.Popen, deadline: float) -> bool:
    """Poll (1 ms) until the trainer is inside a checkpoint write: a .tmp-step-* dir exists, or a step-N
    dir newer than the last checkpoint the database recorded. False if it exits or time runs out."""
    out, conn, recorded_up_to = run.work / "out", None, -1
    try:
        while trainer.poll() is None and time.monotonic() < deadline:
            names = os.listdir(out) if out.exists() else []
            if any(n.startswith(".tmp-step-") for n in names):
                return True
            steps = [int(n[5:]) for n in names if n.startswith("step-") and n[5:].isdigit()]
            if steps and max(steps) > recorded_up_to:
                conn = conn or connect(run.db)
                last = RunMeta(conn).last_checkpoint()
                recorded_up_to = last.step if last else -1
                if max(steps) > recorded_up_to:
                    return True
            time.sleep(0.001)
        return False
    finally:
        if conn is not None:
            conn.close()


SCENARIOS = {
    "random-kills": random_kills,
    "second-trainer": second_trainer,
    "max-steps": max_steps,
    "regenerate-short-ttl": regenerate_short_ttl,
    "clock-jump": clock_jump,
    "checkpoint-kills": checkpoint_kills,
}
TOTALS = ("lost", "trained_twice", "dead", "leaked_bytes", "stale_checkpoint_dirs", "unrefused_trainers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="random SIGKILLs in the random-kills scenario")
    parser.add_argument("--samples", type=int, default=96, help="dataset rows of the random-kills run")
    parser.add_argument("--scenario-samples", type=int, default=24, help="dataset rows of every other scenario")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here instead of a temp dir")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; pick from {', '.join(SCENARIOS)}")
    torch.set_num_threads(1)
    start_time = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dataflow-chaos-") as tmp:
        work = args.work or Path(tmp)
        target = build_tiny_target(work / "target", hidden_size=64, seed=args.seed)
        results = {}
        for i, name in enumerate(chosen):
            samples = args.samples if name == "random-kills" else args.scenario_samples
            run = Run(work / name, target, samples, args.seed + i)
            scenario_start = time.monotonic()
            try:
                SCENARIOS[name](run, random.Random(args.seed + i), args.kills)
                failure = {}
            except ScenarioFailed as e:
                failure = {"failed": str(e)[-1500:]}
            results[name] = {**run.verify(), **failure, "wall_s": round(time.monotonic() - scenario_start, 1)}
    summary = {
        "kills": sum(r["kills"] for r in results.values()),
        "scenarios": len(results),
        **{key: sum(r.get(key, 0) for r in results.values()) for key in TOTALS},
        "failed_scenarios": sorted(name for name, r in results.items() if "failed" in r),
        "loss_finite": all(r["loss_finite"] for r in results.values()),
        "wall_s": round(time.monotonic() - start_time, 1),
        "per_scenario": results,
    }
    print(json.dumps(summary))
    ok = not any(summary[key] for key in TOTALS) and summary["loss_finite"] and not summary["failed_scenarios"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
