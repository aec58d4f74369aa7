"""`dataflow run`: the rollout and the trainer as two child processes on one run, with one live view.

The two commands stay the primary interface; this only spawns them, routes each option to the command(s)
that accept it, shows the run's status plus the tail of each child's log, forwards Ctrl-C, SIGTERM and
SIGHUP to both (as each child's own graceful stop) and waits for them, and fails if either child fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from dataflow.errors import DataflowError, InputError, Interrupted

ROLES = ("rollout", "train")
# What each child treats as "stop at a safe point, stay resumable": the rollout hands its prompt leases back
# on Ctrl-C; the trainer finishes its step, checkpoints and releases its leases on SIGTERM.
STOP_SIGNALS = {"rollout": signal.SIGINT, "train": signal.SIGTERM}
STOP_GRACE_S = 60.0
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # SIGINT arrives as KeyboardInterrupt
TRAINER_NICENESS = 10  # how far the trainer's CPU priority is below the rollout's: see yield_cpu


def option_arity(command) -> dict[str, bool]:
    """Every option string a click command accepts -> whether it takes a value. (Duck-typed: typer ships
    its own copy of click, so its options are not `click.Option` instances.)"""
    arity = {}
    for param in command.params:
        if param.param_type_name == "option":
            for name in (*param.opts, *param.secondary_opts):
                arity[name] = not (param.is_flag or param.count)
    return arity


# Options both commands have that mean the same to both: given once, they go to both. Any other option both
# have (--epochs: dataset passes for the rollout, feature replays for the trainer) must name its command.
TO_BOTH = ("--db", "--config", "--device", "--threads", "--seed", "--dtype", "--lease-ttl", "--verbose",
           "--progress", "--no-progress", "--allow-network-fs")


def route_options(args: list[str], commands: dict) -> dict[str, list[str]]:
    """Send each `--opt [value]` to the command that knows it, TO_BOTH ones to both; `--train-opt` /
    `--rollout-opt` go to that command only; unknown and ambiguous ones are errors."""
    arities = {role: option_arity(cmd) for role, cmd in commands.items()}
    routed: dict[str, list[str]] = {role: [] for role in commands}
    i = 0
    while i < len(args):
        name, _, inline_value = args[i].partition("=")
        takers = [role for role, arity in arities.items() if name in arity]
        for role in commands:
            own = "--" + name.removeprefix(f"--{role}-")
            if name.startswith(f"--{role}-") and own in arities[role]:
                takers, name = [role], own
                args = [*args[:i], own + (f"={inline_value}" if inline_value else ""), *args[i + 1 :]]
        if not takers:
            raise InputError(f"`dataflow run`: option {args[i]!r} is known to neither `dataflow rollout` nor `dataflow train`")
        if len(takers) > 1 and name not in TO_BOTH:
            prefixed = " and/or ".join(f"--{role}-{name[2:]}" for role in takers)
            raise InputError(f"`dataflow run`: {name} means different things to {' and '.join(takers)}; pass {prefixed}")
        takes_value = any(arities[role][name] for role in takers) and not inline_value
        if takes_value and i + 1 >= len(args):
            raise InputError(f"`dataflow run`: option {name} needs a value")
        chunk = args[i : i + 2] if takes_value else args[i : i + 1]
        for role in takers:
            routed[role] += chunk
        i += len(chunk)
    return routed


@dataclass
class Child:
    role: str
    log_path: Path
    proc: subprocess.Popen
    tail: deque = field(default_factory=lambda: deque(maxlen=4))
    _offset: int = 0

    def poll_log(self) -> None:
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        self._offset += len(chunk)
        for line in chunk.decode(errors="replace").replace("\r", "\n").splitlines():
            if line.strip():
                self.tail.append(line.rstrip())


def spawn(role: str, args: list[str], log_dir: Path) -> Child:
    log_path = log_dir / f"{role}.log"
    log = open(log_path, "ab")
    start_offset = log.tell()
    # Own process group: a terminal Ctrl-C reaches only us, and we decide how the children stop.
    proc = subprocess.Popen(
        [sys.executable, "-m", "dataflow", role, *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    if role == "train":
        yield_cpu(proc.pid)
    return Child(role, log_path, proc, _offset=start_offset)


def yield_cpu(pid: int) -> None:
    """Rank the trainer below the rollout for CPU time. On shared cores both run torch thread pools, and
    interleaved each stalls the other's parallel regions at their barriers: next to the trainer, the rollout's
    capture forward took 59 s instead of 17 s (192 samples, 2 cores) and the run 128 s; with the rollout
    first, 98 s. Niceness 10, not 19: the trainer keeps ~10% of a contended CPU, so its step stays far
    inside its lease TTL. It leads its own session, which on Linux is its own autogroup, and a process's
    niceness ranks it only within its group: so the group's niceness is set too (best effort: both)."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, min(os.getpriority(os.PRIO_PROCESS, pid) + TRAINER_NICENESS, 19))
        Path(f"/proc/{pid}/autogroup").write_text(str(TRAINER_NICENESS))
    except OSError:  # no autogroups (the process niceness then does it), or the child already exited
        pass


def view(conn, children: list[Child]):
    from dataflow.ui import collect, status_view

    parts = [status_view(collect(conn))]
    for child in children:
        state = "running" if child.proc.poll() is None else f"exited {child.proc.returncode}"
        body = Text("\n".join(child.tail) or "(no output yet)")
        parts.append(Panel(body, title=f"{child.role} (pid {child.proc.pid}, {state}) {child.log_path}"))
    return Group(*parts)


def stop(children: list[Child]) -> None:
    """Each child's graceful stop signal first, SIGKILL after a grace period."""
    for child in children:
        if child.proc.poll() is None:
            child.proc.send_signal(STOP_SIGNALS[child.role])
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        try:
            child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()


class StopRequests:
    """While installed, SIGTERM/SIGHUP only record that a stop was asked for (the loop stops the children);
    the previous handlers come back on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        for signum in FORWARDED_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _record(self, signum, frame) -> None:
        self.signum = signum


def run_pair(db: Path, routed: dict[str, list[str]], log_dir: Path, refresh_s: float = 1.0) -> None:
    from dataflow.control.db import connect

    conn = connect(db, allow_network_fs="--allow-network-fs" in routed["train"])  # created before either starts
    # A trainer restart re-queues prompts whose features were freed: keep the rollout around to redo them.
    routed = {**routed, "rollout": [*routed["rollout"], "--wait-for-trainer"]}
    log_dir.mkdir(parents=True, exist_ok=True)
    console = Console()
    with StopRequests() as requests:
        children = [spawn(role, routed[role], log_dir) for role in ROLES]
        try:
            watch(conn, children, console, requests, refresh_s)
        finally:  # Ctrl-C, a stop signal, a failed child, or both done: never leave a child behind
            stop(children)
    if requests.signum is not None:
        raise Interrupted(requests.signum)
    for c in children:
        c.poll_log()
    failed = [c for c in children if c.proc.returncode not in (0, 130, -signal.SIGINT, -signal.SIGTERM)]
    if failed:
        first = failed[0]
        last = first.tail[-1] if first.tail else "no output"
        raise DataflowError(
            f"`dataflow {first.role}` failed (exit {first.proc.returncode}): {last}; full log in {first.log_path}"
        )


def watch(conn, children: list[Child], console: Console, requests: StopRequests, refresh_s: float) -> None:
    """The live view, until the trainer exits (finished or paused: a rollout waiting for it would wait
    forever), a child fails, or a stop signal arrives."""
    trainer = next(c for c in children if c.role == "train")
    with Live(view(conn, children), console=console, auto_refresh=False) as live:
        while trainer.proc.poll() is None and requests.signum is None:
            if any(c.proc.poll() not in (None, 0) for c in children):
                return
            time.sleep(refresh_s)
            for c in children:
                c.poll_log()
            live.update(view(conn, children), refresh=True)
