"""The errors a user can cause; each message names the culprit (a params key, a file, a URI)."""


class ParamsError(ValueError):
    """params.yaml holds something the pipeline cannot use; one line per problem."""


class CheckpointError(ValueError):
    """A model, score or data file that cannot be trusted or read; the message names the file."""


class DataError(RuntimeError):
    """A dataset that cannot be had; the message says what to place where."""


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names its URI."""
