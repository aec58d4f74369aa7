"""The control plane's wall clock.

Leases, heartbeats and checkpoints carry wall-clock stamps compared across processes (docs/architecture.md, invariant 3).
`DATAFLOW_CLOCK_OFFSET_S` shifts this process's clock by that many seconds, so that a chaos run or a test
can give processes on one host clocks that disagree, as an NTP step or a VM suspend/resume does.
"""

from __future__ import annotations

import os
import time

OFFSET_S = float(os.environ.get("DATAFLOW_CLOCK_OFFSET_S") or 0.0)


def now() -> float:
    return time.time() + OFFSET_S
