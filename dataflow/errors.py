"""The one error hierarchy. The CLI prints any DataflowError as one line and exits non-zero."""


class DataflowError(Exception):
    """A user-facing failure: the message says what, where, and what to do."""

    exit_code = 2


class DatabaseError(DataflowError):
    """The run database cannot be used (not ours, too new, network FS, unwritable)."""


class ConfigMismatch(DataflowError):
    """A process joined a run whose recorded config differs from its own."""


class InputError(DataflowError):
    """Bad user input: a missing file, a malformed row, an inconsistent option."""


class StoreError(DataflowError):
    """The data plane cannot serve a request (arena too small, /dev/shm too small, ...)."""


class FeaturesLost(StoreError):
    """A handle's bytes are gone or were reused (producer died, generation changed)."""
