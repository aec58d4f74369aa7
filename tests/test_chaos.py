"""The short chaos run: real rollout + trainer processes, SIGKILLed at random and restarted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_random_sigkills_lose_nothing_train_nothing_twice_and_leak_no_shared_memory(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chaos.py"), "--kills", "3", "--samples", "24", "--seed", "1",
         "--scenarios", "random-kills", "--work", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["scenarios"] == 1 and report["kills"] >= 1, report
    assert report["lost"] == 0 and report["trained_twice"] == 0, report
    assert report["dead"] == 0 and report["leaked_bytes"] == 0, report
    run = report["per_scenario"]["random-kills"]
    assert run["final_model_samples"] == 24 and report["loss_finite"], report
    assert result.returncode == 0, result.stderr[-2000:]
