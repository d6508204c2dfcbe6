"""Expected failures: bad input, bad configs, damaged or incompatible checkpoints, busy workdirs.

Each is an error of the user's situation, not of the code, and says in one line what is wrong
and where. The programs print it as one line and exit non-zero; anything else is a bug and
keeps its traceback.
"""


class PhoenixError(Exception):
    """An expected failure with a message a user can act on."""


class DatasetError(PhoenixError):
    """A prepared dataset is missing, or does not fit the model (e.g. another action vocabulary)."""
