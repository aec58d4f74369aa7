import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gc_and_status_side_of_transport_imports_without_torch():
    code = "import sys; from dataflow.transport import sweep, usage; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_the_transport_benchmark_prints_one_json_object_last():
    out = subprocess.run(
        [sys.executable, "scripts/bench_transport.py", "--smoke"], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for size in report["sizes"].values():
        assert set(size["methods"]) >= {"copy_touch", "arena", "arena_sqlite", "torch_save_load", "mp_queue"}
        assert all(m["median_ms"] > 0 for m in size["methods"].values())
    assert report["arenas_left_after_sweep"] == []
