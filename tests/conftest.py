"""What several test modules share: one bounded wait, the tiny target, and a fresh run database.

Every test gets its own run database; on teardown the run must have left nothing in /dev/shm (checked
by run prefix, so helpers' tests running beside ours on the same machine never interfere).

The suite runs torch.compile'd code eagerly, in its own process and in every process it spawns (they inherit
the environment): a compile costs tens of seconds per process on 2 cores, and the tiny test models gain nothing
from it. tests/test_train_step.py turns compilation back on to check the compiled step itself."""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # before anything imports torch

import multiprocessing
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.rollout.data import DEFAULT_HELD_OUT, load_dataset, split_held_out
from dataflow.transport.owner import store_name
from dataflow.transport.segment import SHM_DIR

WAIT_S = 120.0  # generous: 2 shared cores, real processes loading a model

# A suite started in the background by a non-interactive shell (`nohup ... &`) ignores SIGINT, and the processes
# it spawns inherit that, so the tests' Ctrl-C (SIGINT to a child) would do nothing. The tests stand for a user at
# a terminal: spawned processes start with SIGINT at its default, which Python turns into KeyboardInterrupt.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def wait_until(predicate: Callable[[], object], what: str, *, timeout: float = WAIT_S,
               process: subprocess.Popen | multiprocessing.Process | None = None, every: float = 0.05) -> None:
    """Poll `predicate` until it is true: a wait, never a timing assertion. Fails the test after `timeout`
    seconds, or at once when `process` (the one that should make it true) exits first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and exit_code(process) is not None:
            raise AssertionError(f"the process exited ({exit_code(process)}) before {what}: {output_of(process)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting until {what}")
        time.sleep(every)


def training_ids(n: int) -> list[str]:
    """The ids of the bundled dataset's first `n` rows a rollout trains on (the held-out rows skipped)."""
    return [s.id for s in split_held_out(load_dataset().samples, DEFAULT_HELD_OUT)[0][:n]]


def exit_code(process: subprocess.Popen | multiprocessing.Process) -> int | None:
    return process.poll() if isinstance(process, subprocess.Popen) else process.exitcode


def output_of(process: subprocess.Popen | multiprocessing.Process) -> str:
    """The tail of what an exited subprocess wrote to its captured pipe (stdout, else stderr)."""
    pipe = getattr(process, "stdout", None) or getattr(process, "stderr", None)
    if pipe is None:
        return "(output not captured)"
    text = pipe.read()
    return (text.decode(errors="replace") if isinstance(text, bytes) else text)[-3000:]


def leftover_segments(run_id: str) -> list[Path]:
    return sorted(SHM_DIR.glob(store_name("dataflow", run_id) + "*"))


@pytest.fixture
def run_db(tmp_path):
    """The path of a fresh run database; fails the test if the run leaks an arena (and cleans it up)."""
    path = tmp_path / "run.sqlite"
    conn = connect(path)
    run_id = RunMeta(conn).run_id
    conn.close()
    yield path
    leaked = leftover_segments(run_id)
    for p in leaked:
        p.unlink(missing_ok=True)
    assert not leaked, f"leaked shared-memory segments: {leaked}"


@pytest.fixture
def conn(run_db):
    """A connection to this test's fresh run database."""
    connection = connect(run_db)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    """The tiny Llama target (SmolLM2's tokenizer), built once per module."""
    from dataflow.testing import build_tiny_target

    return build_tiny_target(tmp_path_factory.mktemp("tiny") / "t")


@pytest.fixture(scope="module")
def tiny_train_target(tmp_path_factory):
    """The trainer's tiny target: no tokenizer, a confident teacher head, built once per module."""
    from dataflow.train.testing import build_tiny_target

    return build_tiny_target(tmp_path_factory.mktemp("target") / "tiny")


@pytest.fixture(scope="module")
def tiny_engine(tiny_target):
    """An fp32 HF engine on one thread over the tiny target."""
    from dataflow.rollout.testing import tiny_engine

    return tiny_engine(tiny_target)
