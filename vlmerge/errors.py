"""One exception type for bad input: the CLI prints its message once and exits non-zero."""

import sys
from collections.abc import Callable


class VlmergeError(Exception):
    """A problem with the user's input (config, checkpoint, data) that the user can fix.

    The message must name the culprit (file, tensor, key, item ids) and, where useful, the fix.
    """

    exit_code = 2


def exit_on_user_error(main: Callable[[], object]) -> None:
    """Run a plain (non-Hydra) command's `main`: a VlmergeError ends as one `error: ...` line on stderr and
    its exit code, as the Hydra commands do."""
    try:
        main()
    except VlmergeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
