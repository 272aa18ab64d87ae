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


class TrainingDiverged(RewardboothError):
    """A loss or gradient went NaN/inf: the run stopped without a result (its last finite checkpoint is kept)."""

    exit_code = 3
    opening = "training diverged at step"  # every message starts so: the web app tells it from other errors by it


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, honoured at a step boundary once the step is checkpointed: a stop, not a crash."""

    def __init__(self, step: int):
        super().__init__(step)  # the step alone: pickled across bench worker processes and rebuilt from it
        self.step = step

    def __str__(self) -> str:
        return f"stopped at step {self.step}"
