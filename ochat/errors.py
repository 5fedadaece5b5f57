"""One kind of user-facing error: the CLI prints it on one line and exits with code 2."""


class OchatError(Exception):
    """A problem with the user's input (file, field, flag). Never a bug in ochat."""

    exit_code = 2
