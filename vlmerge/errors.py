"""One exception type for bad input: the CLI prints its message once and exits non-zero."""


class VlmergeError(Exception):
    """A problem with the user's input (config, checkpoint, data) that the user can fix.

    The message must name the culprit (file, tensor, key, item ids) and, where useful, the fix.
    """

    exit_code = 2
