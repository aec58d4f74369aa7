"""scripts/bench_queue.py runs end to end on a tiny N and prints its JSON result last (no speed asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_queue.py"


def test_the_queue_benchmark_checks_every_item_and_prints_one_json_object_last(tmp_path):
    pytest.importorskip("litequeue")
    pytest.importorskip("persistqueue")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--n", "150", "--repeats", "1", "--dir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode in (0, 1), done.stderr  # 1 = targets missed, which a tiny N may well do
    result = json.loads(done.stdout.strip().splitlines()[-1])
    required = ("n", "backlog_ops_s", "conc_ops_s", "duplicates", "lost", "ratio_vs_litequeue_backlog")
    assert all(key in result for key in required + ("ratio_vs_litequeue_conc",))
    assert result["n"] == 150 and result["duplicates"] == 0 and result["lost"] == 0
    assert set(result["backlog_ops_s"]) == {"dataflow", "dataflow_unbatched", "litequeue", "persistqueue"}
    for backend in ("dataflow", "litequeue"):
        assert result["per_backend_checks"][backend]["backlog"] == {"duplicates": 0, "lost": 0}


def test_the_queue_benchmark_refuses_an_unknown_backend_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--backends", "dataflow,redis"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "--backends" in done.stderr.splitlines()[-1]


SCALE_SCRIPT = SCRIPT.with_name("bench_scale.py")


def test_the_scale_benchmark_prints_the_table_compaction_and_the_wal_as_one_json_object_last(tmp_path):
    """Also the WAL bound under real processes: a writer under sustained load and two status pollers."""
    done = subprocess.run(
        [sys.executable, str(SCALE_SCRIPT), "--sizes", "200,400", "--repeats", "2", "--wal-seconds", "5",
         "--wal-bound", str(2 * 1024 * 1024),
         "--dir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode in (0, 1), done.stderr  # 1 = targets missed, which tiny sizes on a busy host may do
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["table"]) == {"200", "400"}
    for key in ("lease_ms", "partitioned_lease_ms", "ack_ms", "status_ms", "db_bytes", "growth_1m_over_10k",
                "compaction_refs_per_s", "db_used_bytes_per_million_refs_after_compaction"):
        assert result[key] >= 0, key
    assert result["growth_1m_over_10k"] == max(result["growth"].values())
    assert result["compacted_refs"] == result["trained_refs"] == result["trained_after_compaction"] == 400
    assert (result["db_used_bytes_per_million_refs_after_compaction"]
            < result["db_used_bytes_per_million_refs_before_compaction"])
    bound = result["wal_bound_bytes"]  # small, so that a few seconds show the difference on a busy host too
    assert result["max_wal_bytes_unbounded"] > 4 * bound  # the pollers do starve SQLite's own checkpoints
    assert result["max_wal_bytes"] <= 4 * bound  # (the bench's own target, at the default bound, is 2x)
