"""The one exception type the CLI turns into a clear message and exit code 2."""


class CvlabError(Exception):
    """A user-facing error: bad input, bad config, unreachable service. Printed without a traceback."""

    exit_code = 2
