"""The errors that mean "the user asked for something that cannot be done", all in one module.

Each is raised with a one-line message that names the file, flag or value and says what is accepted or what to do.
`vancls.config.run_cli` prints it as `error: MESSAGE` (no traceback) and exits with `exit_status(error)`. This module
imports nothing from the project, so that every other module can import it (no import cycles).
"""


class UsageError(ValueError):
    """Bad command-line input or option combination; exit status 2."""


class DataError(ValueError):
    """The data set cannot be used (missing folder, no classes, no readable image, bad class map); exit status 2."""


class DeviceError(RuntimeError):
    """The requested device cannot be used here; the message says why and what to do. Exit status 1."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or does not fit; the message names the file. Exit status 1."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step. Exit status 1."""


class ExportCheckError(RuntimeError):
    """export.py: the exported model does not compute what the PyTorch model computes. Exit status 1."""


class HubError(RuntimeError):
    """export.py --push-to-hub cannot reach the Hugging Face Hub, or the upload failed. Exit status 1."""


# What run_cli turns into one line on stderr. FileNotFoundError: a path given on the command line.
USER_ERRORS = (UsageError, DataError, DeviceError, CheckpointError, NonFiniteLossError, ExportCheckError, HubError,
               FileNotFoundError)


def exit_status(error: BaseException) -> int:
    """2 for bad input (the command line or the data, as argparse), 1 for a run that could not go on."""
    return 2 if isinstance(error, (UsageError, DataError)) else 1
