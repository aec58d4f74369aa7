"""The suite runs torch.compile'd code eagerly, in its own process and in every process it spawns (they inherit
the environment): a compile costs tens of seconds per process on 2 cores, and the tiny test models gain nothing
from it. tests/test_train_step.py turns compilation back on to check the compiled step itself."""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
