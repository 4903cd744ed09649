"""The project's own exception type.

Errors a user can cause (a wrong path, a checkpoint of an unknown kind, mismatched parts, a bad
image) are raised as :class:`TinyLlavaError` with one sentence that names the thing and what was
expected. The command-line entry points print that sentence without a traceback and exit non-zero.
"""


class TinyLlavaError(Exception):
    """A problem the user can fix, described in one sentence."""


class CheckpointError(TinyLlavaError):
    """A checkpoint directory that cannot be read: missing, corrupt, or of an unknown layout."""


class DataError(TinyLlavaError):
    """Training or evaluation data that cannot be used as given."""
