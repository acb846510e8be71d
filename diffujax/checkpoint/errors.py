"""The one error type of the checkpoint package."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, converted or written; the message names the file, tensor
    or key at fault (and what was expected)."""
