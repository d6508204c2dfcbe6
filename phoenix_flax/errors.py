"""Expected failures: bad input, bad configs, damaged or incompatible checkpoints, busy workdirs.

Each is an error of the user's situation, not of the code, and says in one line what is wrong
and where. The programs print it as one line and exit non-zero; anything else is a bug and
keeps its traceback.
"""


class PhoenixError(Exception):
    """An expected failure with a message a user can act on."""


class DatasetError(PhoenixError):
    """A prepared dataset is missing, or does not fit the model (e.g. another action vocabulary)."""


class CheckpointError(PhoenixError):
    """A run's checkpoints cannot be used as asked."""


class DamagedCheckpointError(CheckpointError):
    def __init__(self, step: int, item: str, reason: str):
        self.step, self.item, self.reason = step, item, reason
        super().__init__(f"checkpoint step {step} is damaged: {item}: {reason}")


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint was written by a model or optimizer of other shapes than the config's."""


class CheckpointSaveError(CheckpointError):
    """A save that could not write: a full disk, a file-size limit, a read-only folder."""

    def __init__(self, steps, directory: str, reason: str, last_saved: int | None):
        kept = f"step {last_saved} is the last saved" if last_saved is not None else "no step was saved"
        hint = (
            " (a full disk or a file-size limit?)" if any(w in reason for w in ("space", "too large", "quota")) else ""
        )
        super().__init__(
            f"cannot save checkpoint step {', '.join(map(str, steps))} in {directory}: {reason}{hint}; {kept}"
        )
