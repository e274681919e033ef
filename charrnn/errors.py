"""The few exceptions charrnn raises; the CLI maps each to one line and an exit code."""


class CharRNNError(Exception):
    """Something the user can fix: bad data, a bad checkpoint, a bad setting.

    The message is one line saying what is wrong and what to do.
    """

    exit_code = 1


class UsageError(CharRNNError):
    """A flag or config value that is out of range (exit code 2, like Typer's own)."""

    exit_code = 2


class DataError(CharRNNError):
    """A corpus or text that cannot be read, decoded or encoded."""


class CheckpointError(CharRNNError):
    """A file that is not a readable charrnn checkpoint."""


class TrainingInterrupted(CharRNNError):
    """Training was stopped by Ctrl-C after last.pt was saved."""

    exit_code = 130
