"""The one exception type users see: its message is a single line that says what to fix."""


class NeurolangError(Exception):
    """A user-facing error; the command line prints it as one line and exits with status 2."""
