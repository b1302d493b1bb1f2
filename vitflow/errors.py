"""The one exception type the command line turns into a one-line message."""


class VitflowError(Exception):
    """Bad input or setting: the message names the file or setting and what to do."""
