"""A run's database or store in a bad state (corrupt, not ours to write, full disk): every command says so
in one line and exits 2, and the run stays consistent.

Permissions and full disks are real: a user namespace where the files' owner is unmapped (so even root
cannot write them), and a small tmpfs mounted in a private mount namespace, filled up.
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataflow.control.db import connect
from dataflow.control.tasks import TaskQueue

ROOT = Path(__file__).resolve().parents[1]
STRANGER = 54321  # a uid no namespace of ours maps
DATAFLOW = f"{sys.executable} -m dataflow"


def namespaces_available() -> bool:
    probe = ["unshare", "--user", "--map-root-user", "--mount", "true"]
    return subprocess.run(probe, capture_output=True).returncode == 0


needs_namespaces = pytest.mark.skipif(not namespaces_available(), reason="needs user and mount namespaces")


def in_namespace(script: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a bash script as an unprivileged root: files of STRANGER are not ours, mounts stay private."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATAFLOW_DEBUG": "0"}
    command = ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def dataflow(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATAFLOW_DEBUG": "0"}
    return subprocess.run([sys.executable, "-m", "dataflow", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def one_error_line(stderr: str) -> str:
    """The one error line (progress bars of model loading may come before it), and no traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr and stderr.rstrip().endswith(lines[0]), stderr
    return lines[0]


def run_with_tasks(db: Path, n: int = 200) -> None:
    conn = connect(db)
    TaskQueue(conn).add_many([(f"k{i}", {"text": "x" * 400}) for i in range(n)])
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_corrupt_database_page_is_one_line_and_exit_2_for_every_command(tmp_path):
    db = tmp_path / "run.sqlite"
    run_with_tasks(db)
    with open(db, "r+b") as f:  # every page but the first (the schema) becomes garbage
        f.seek(4096)
        f.write(os.urandom(db.stat().st_size - 4096))
    for command in (["status"], ["status", "--json"], ["gc"], ["dead"]):
        result = dataflow(*command, "--db", str(db))
        assert result.returncode == 2, (command, result.stderr)
        assert "corrupt" in one_error_line(result.stderr) and str(db) in result.stderr


@needs_namespaces
def test_a_read_only_database_is_one_line_even_for_status_and_is_left_unchanged(tmp_path):
    db = tmp_path / "run.sqlite"
    run_with_tasks(db)
    os.chown(db, STRANGER, STRANGER)
    db.chmod(0o644)  # readable by all, writable by its owner only
    before = digest(db)
    result = in_namespace(f"{DATAFLOW} status --db {db}; echo rc=$?")
    assert "rc=2" in result.stdout, (result.stdout, result.stderr)
    line = one_error_line(result.stderr)
    assert "not writable by this user" in line and "fix the permissions" in line and str(db) in line
    assert digest(db) == before


@needs_namespaces
def test_unwritable_wal_and_shm_files_say_to_fix_their_permissions(tmp_path):
    db = tmp_path / "run.sqlite"
    run_with_tasks(db)
    holder = connect(db)  # an open connection keeps -wal and -shm on disk
    try:
        for suffix in ("-wal", "-shm"):
            os.chown(f"{db}{suffix}", STRANGER, STRANGER)
            os.chmod(f"{db}{suffix}", 0o644)
        result = in_namespace(f"{DATAFLOW} status --db {db}; echo rc=$?")
        assert "rc=2" in result.stdout, (result.stdout, result.stderr)
        line = one_error_line(result.stderr)
        assert "fix the permissions" in line and f"{db}-shm" in line and "pass a new --db" not in line
    finally:
        holder.close()
        for suffix in ("-wal", "-shm"):
            if Path(f"{db}{suffix}").exists():
                os.chown(f"{db}{suffix}", 0, 0)


def rollout_args(db: Path, target: Path, *extra: str) -> str:
    return (f"{DATAFLOW} rollout --db {db} --target-model {target} --num-samples 4 --max-length 96 --threads 1 "
            f"--no-progress --draft-vocab-size 256 --tasks-per-lease 4 " + " ".join(extra))


@needs_namespaces
def test_a_full_disk_under_the_database_is_one_line_and_the_run_resumes_once_space_is_freed(tmp_path, tiny_target):
    disk = tmp_path / "disk"
    disk.mkdir()
    db = disk / "run.sqlite"
    script = f"""
        mount -t tmpfs -o size=1m tmpfs {disk}
        {sys.executable} -c "from dataflow.control.db import connect; connect('{db}').close()"
        dd if=/dev/zero of={disk}/filler bs=4k 2>/dev/null
        {rollout_args(db, tiny_target, "--store", "shm")}; echo rollout_rc=$?
        rm {disk}/filler
        {rollout_args(db, tiny_target, "--store", "shm")} >/dev/null 2>&1; echo resumed_rc=$?
        {DATAFLOW} status --db {db} --json; echo status_rc=$?
        {DATAFLOW} gc --db {db} --all-orphans >/dev/null
    """
    result = in_namespace(script)
    assert "rollout_rc=2" in result.stdout, (result.stdout, result.stderr)
    line = one_error_line(result.stderr)
    assert "full" in line and str(disk) in line
    assert "resumed_rc=0" in result.stdout and "status_rc=0" in result.stdout, result.stdout
    assert '"done": 4' in result.stdout and '"pending": 4' in result.stdout  # 4 tasks produced, 4 refs pending


@needs_namespaces
def test_a_full_disk_under_the_files_store_is_one_line_and_hands_the_prompts_back(tmp_path, tiny_target):
    db, disk = tmp_path / "run.sqlite", tmp_path / "disk"
    disk.mkdir()
    connect(db).close()
    store = f"--store files --store-dir {disk}"
    script = f"""
        mount -t tmpfs -o size=1m tmpfs {disk}
        mkdir -p {disk}/x && dd if=/dev/zero of={disk}/x/filler bs=4k count=254 2>/dev/null  # 2 pages left
        {rollout_args(db, tiny_target, store)}; echo rollout_rc=$?
        rm {disk}/x/filler
        {rollout_args(db, tiny_target, store)} >/dev/null 2>&1; echo resumed_rc=$?
    """
    result = in_namespace(script)
    assert "rollout_rc=2" in result.stdout, (result.stdout, result.stderr)
    line = one_error_line(result.stderr)
    assert "the disk is full" in line and str(disk) in line, line  # at a sample's write, mid-run
    assert "resumed_rc=0" in result.stdout, result.stdout
    assert TaskQueue(connect(db)).counts() == {"pending": 0, "leased": 0, "done": 4, "dead": 0}


def test_status_on_an_empty_file_refuses_it_and_leaves_it_empty(tmp_path):
    db = tmp_path / "empty.sqlite"
    db.touch()
    for command in (["status"], ["gc"], ["dead"]):
        result = dataflow(*command, "--db", str(db))
        assert result.returncode == 2 and "an empty file, not a run database" in one_error_line(result.stderr)
    assert db.stat().st_size == 0 and not Path(f"{db}-wal").exists()


def test_invalid_utf8_in_a_dataset_is_a_file_line_error_unless_skipped(tmp_path):
    from dataflow.errors import InputError
    from dataflow.rollout.data import load_dataset

    dataset = tmp_path / "data.jsonl"
    good = b'{"id": "a", "text": "fine"}\n'
    dataset.write_bytes(good + b'{"id": "b", "text": "caf\xe9 latin-1"}\n' + good.replace(b'"a"', b'"c"'))
    with pytest.raises(InputError, match=rf"{dataset}:2: invalid UTF-8 at byte 24"):
        load_dataset(dataset)
    loaded = load_dataset(dataset, on_bad_row="skip")
    assert [s.id for s in loaded.samples] == ["a", "c"] and loaded.skipped[0].startswith(f"{dataset}:2: invalid UTF-8")
