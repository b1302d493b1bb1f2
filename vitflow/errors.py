"""The exceptions the command line turns into one line, and the exit code of each kind."""


class VitflowError(Exception):
    """Bad input or setting: the message names the file or setting and what to do."""

    exit_code = 2


class ServiceUnreachable(VitflowError):
    """A server vitflow needs (the MLflow tracking server, the Prefect API) did not answer, even after retries."""

    exit_code = 3
