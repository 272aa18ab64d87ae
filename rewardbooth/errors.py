"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class RewardboothError(Exception):
    """Base class for errors caused by user input (files, settings), not by bugs."""

    exit_code = 2


class ImageFolderError(RewardboothError):
    """A reference-image folder or one of its files cannot be used."""


class ConfigError(RewardboothError):
    """A setting is missing, unknown or out of range."""


class CheckpointError(RewardboothError):
    """A checkpoint cannot be trusted or read."""


class OutputExistsError(RewardboothError):
    """The output folder already holds something we would overwrite."""
