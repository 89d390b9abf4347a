"""Hydra's own refusals of a command line (an unknown key, a config group option that does not exist, an
override that does not parse) as one `error:` line and exit status 2, as vlmerge's own bad-input errors end.

Hydra 1.3 reports such errors through `hydra._internal.utils.run_and_report` (several lines, exit 1); while a
command runs, `hydra_errors_in_one_line` wraps that function. With another Hydra (no such function) Hydra's own
reports stay. HYDRA_FULL_ERROR=1 keeps Hydra's traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

from vlmerge.errors import VlmergeError


@contextlib.contextmanager
def hydra_errors_in_one_line(command_code):
    """Hydra reports an error through hydra._internal.utils.run_and_report (several lines, exit 1); the
    errors that are the command line's (not raised by the command itself, whose frames run `command_code`) end
    here in one line, exit 2."""
    import hydra._internal.utils as hydra_utils

    original = getattr(hydra_utils, "run_and_report", None)
    if original is None:  # another Hydra than the 1.3 this was written for: its own reports
        yield
        return

    def run_and_report(func):
        def guarded():
            try:
                return func()
            except Exception as err:
                line = None if _full_error_wanted() else hydra_error_line(err, command_code)
                if line is None:
                    raise
                print(f"error: {line}", file=sys.stderr)
                sys.exit(VlmergeError.exit_code)

        return original(guarded)

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        hydra_utils.run_and_report = original


def _full_error_wanted() -> bool:
    """HYDRA_FULL_ERROR=1, as Hydra reads it (not Hydra's debugger guess: sys.gettrace() is set under coverage)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def hydra_error_line(err: BaseException, command_code=None) -> str | None:
    """One line for a config error of Hydra or OmegaConf that the command did not raise itself; None for
    anything else (a bug keeps its traceback)."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if not isinstance(err, (HydraException, OmegaConfBaseException)) or _raised_by_the_command(err, command_code):
        return None
    if isinstance(err, OverrideParseException):
        skip = ("Error parsing override", "See http", "LexerNoViableAltException")  # the override, a link, a caret
        detail = [line for line in _lines(err.message) if not line.startswith(skip) and line.strip("^ ")]
        return f"cannot parse the override {err.override!r}" + (f": {detail[0]}" if detail else "")
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, option = err.missing_cfg_file.rpartition("/")
        if group:
            return (f"no option {option!r} in config group {group!r} (could not find '{err.missing_cfg_file}'); "
                    f"available: {', '.join(err.options)}")  # fmt: skip
    cause = err.__cause__
    unknown = re.match(r"Could not override '([^']+)'\.\s+To append to your config use (\S+)", str(err))
    if unknown and isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and getattr(cause, "full_key", None):
        return (f"could not override {unknown[1]!r}: the config has no key {cause.full_key!r} "
                f"(to add one, use {unknown[2]})")  # fmt: skip
    text = " ".join(_lines(str(err)))
    if isinstance(cause, OmegaConfBaseException):
        first = _lines(str(cause))[:1]
        if first and first[0] not in text:
            text += f" ({first[0]})"
    where = getattr(err, "full_key", None)  # an OmegaConf error, e.g. a bad interpolation in hydra.run.dir
    if isinstance(err, OmegaConfBaseException) and where and where not in text:
        text = f"{where}: {text}"
    return text or type(err).__name__


def _raised_by_the_command(err: BaseException, command_code) -> bool:
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is command_code:
            return True
        tb = tb.tb_next
    return False


def _lines(message: str) -> list[str]:
    """A Hydra or OmegaConf message's lines that say something (no search path, no full_key/object_type)."""
    out = []
    for line in message.split("Config search path:")[0].splitlines():
        line = line.strip()
        if line and not line.startswith(("full_key:", "object_type=", "reference_type=")):
            out.append(line)
    return out
