"""The errors a user can fix: the tools print them (no traceback) and exit with code 2.

Everything else that escapes a tool is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """A user input (config, checkpoint, work dir, command-line option) that cannot be used.

    A ``ValueError``, so callers that already treat ``ValueError`` as bad input keep working.
    """


class CheckpointError(InputError):
    """A checkpoint file that is not readable, or does not fit the model it is loaded into."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle needs types outside the weights-only allowlist."""


class WorkDirBusy(InputError):
    """Another run holds the work dir's lock."""
