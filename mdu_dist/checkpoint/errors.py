"""The one error type of the checkpoint tools."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file or tensor."""
