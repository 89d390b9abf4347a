"""Hydra's own refusals of a command line (an unknown key, a config group option that does not exist, an
override that does not parse) as one `error:` line and exit status 2, as vlmerge's own bad-input errors end.

Hydra 1.3 reports such errors through `hydra._internal.utils.run_and_report` (several lines, exit 1); while a
command runs, `hydra_errors_in_one_line` wraps that function. With another Hydra (no such function) Hydra's own
reports stay. HYDRA_FULL_ERROR=1 keeps Hydra's traceback.

The config's `_target_`s: `bad_target` names one that names no class or function (a typo) before the command
builds anything; `instantiation_error_line` words what Hydra's instantiate refuses before running any code of
ours (arguments the target does not take) in one line; `bad_partial_arguments` words the same for a
`_partial_: true` node before the command builds anything (Hydra never calls its target: the command does,
later). An error raised inside a constructor is not theirs: a VlmergeError says its own message, anything else
(a bug) keeps Hydra's report (HYDRA_FULL_ERROR=1: traceback).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import os
import pkgutil
import re
import sys
from collections.abc import Mapping

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


# --- `_target_`s ---------------------------------------------------------------------------------------------

TARGET_FIX = "set it to the dotted path of a class or function (package.module.Name)"
ARGUMENTS_HINT = "; the keys beside _target_ are the arguments of "
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_convert_", "_recursive_", "_args_"})  # not the target's arguments


def bad_target(cfg) -> str | None:
    """The first `_target_` of a config (DictConfig or plain) that names no class or function, in one line: its
    key and value, what does not exist, what to write; None when every one names something callable. A module
    that exists but fails to import (a bug, a missing dependency) raises its own error."""
    for key, target in _targets(cfg):
        problem = _target_problem(target)
        if problem is not None:
            return f"{key}{'.' if key else ''}_target_ = {target!r}: {problem}"
    return None


def instantiation_error_line(err: BaseException, cfg) -> str | None:
    """One line for what Hydra's instantiate refuses of a config node before any code of ours runs: arguments
    its `_target_` does not take or lacks, a target Hydra will not call. None for anything else: an error
    raised inside a constructor (a bug keeps its traceback), or when HYDRA_FULL_ERROR=1 asks for Hydra's."""
    from hydra.errors import InstantiationException

    cause = err.__cause__
    if _full_error_wanted() or not isinstance(err, InstantiationException):
        return None
    if cause is not None and not (isinstance(cause, TypeError) and _raised_in_hydra(cause)):
        return None
    message = str(err)
    named = re.search(r"target '([^']+)'", message, re.IGNORECASE)
    keys = [key for key, value in _targets(cfg) if named and value == named[1]]
    full_key = re.search(r"^full_key: (\S+)$", message, re.MULTILINE)  # relative to what was instantiated
    where = keys[0] if len(keys) == 1 else full_key[1] if full_key else None
    if cause is None:
        return _at(where, " ".join(_lines(message)))
    return _at(where, f"{cause}{ARGUMENTS_HINT}{named[1] if named else 'its _target_'}")


def bad_partial_arguments(cfg) -> str | None:
    """The first `_partial_: true` node whose keys its `_target_` does not take, in the line
    `instantiation_error_line` gives other nodes; None when there is none, or when HYDRA_FULL_ERROR=1 asks for
    Hydra's report. Hydra checks a node's arguments when it calls the target; a partial node's target is
    called later by the command with the arguments only it knows (`merge.path`: the towers' depths, after
    the model loads), where a TypeError is not the config's. Run after `bad_target`."""
    from hydra._internal.utils import _locate

    if _full_error_wanted():
        return None
    for key, node in _target_nodes(cfg):
        if node.get("_partial_") is not True:
            continue
        target = _locate(node["_target_"])
        arguments = {name: value for name, value in node.items() if name not in HYDRA_KEYS}
        try:
            inspect.signature(target).bind_partial(*node.get("_args_", ()), **arguments)
        except ValueError:  # no signature to read (a builtin): left to the call
            continue
        except TypeError as err:
            return _at(key, f"{_call_name(target)}() {err}{ARGUMENTS_HINT}{node['_target_']}")
    return None


def _at(key: str | None, text: str) -> str:
    """`text` prefixed with the config key it is about, when there is one."""
    return f"{key}: {text}" if key else text


def _call_name(target) -> str:
    """The name Python's own TypeError gives a call of `target`: a class's own `__init__` (`PathSpec.__init__`),
    else the class or function (`make_thing`)."""
    called = target.__init__ if isinstance(target, type) and target.__init__ is not object.__init__ else target
    return getattr(called, "__qualname__", repr(target))


def _targets(cfg) -> list[tuple[str, object]]:
    """(key, value) of every `_target_` in a config, keys as OmegaConf writes them (`merge.genome`, `a.b[0]`)."""
    return [(key, node["_target_"]) for key, node in _target_nodes(cfg)]


def _target_nodes(cfg) -> list[tuple[str, Mapping]]:
    """(key, node) of every node with a `_target_` in a config, as plain mappings. In a config with an
    interpolation that does not resolve, nodes with an interpolated target are skipped (refused where they
    are used)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True)
        except Exception:
            cfg = OmegaConf.to_container(cfg, resolve=False)
    found = []

    def walk(node, key: str) -> None:
        if isinstance(node, Mapping):
            target = node.get("_target_")
            if target is not None and not (isinstance(target, str) and "${" in target):
                found.append((key, node))
            for name, child in node.items():
                walk(child, f"{key}.{name}" if key else str(name))
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{key}[{i}]")

    walk(cfg, "")
    return found


def _target_problem(target) -> str | None:
    """Why `target` names no class or function, as Hydra's instantiate looks it up; None when it does."""
    from hydra._internal.utils import _locate  # what instantiate calls

    if not isinstance(target, str):
        return f"not a dotted path; {TARGET_FIX}"
    try:
        found = _locate(target)
    except (ImportError, ValueError) as err:
        missing = _missing_part(err, target)
        if missing is None:
            raise
        return missing
    return None if callable(found) else f"names a {type(found).__name__}, not a class or function; {TARGET_FIX}"


def _missing_part(err: Exception, target: str) -> str | None:
    """What `_locate(target)`'s error says does not exist ("there is no module 'x'", "'a.b' has no 'C'; did you
    mean 'a.b.D'?"); None when a module that exists failed to import."""
    cause = err.__cause__
    parts = target.split(".")
    if cause is None:  # Hydra's own refusal of the string: empty, or a relative path
        return f"not a dotted path; {TARGET_FIX}"
    if isinstance(cause, ModuleNotFoundError) and cause.name in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
        parent_path, _, name = cause.name.rpartition(".")
        parent = sys.modules.get(parent_path)
    elif isinstance(cause, AttributeError) and getattr(cause, "name", None) in parts[1:]:  # of a class
        name, parent = cause.name, getattr(cause, "obj", None)
        parent_path = ".".join(parts[: parts.index(name, 1)])
    else:
        return None
    if not parent_path:
        return f"there is no module {name!r}; {TARGET_FIX}"
    names = set() if parent is None else {n for n in dir(parent) if not n.startswith("_")}
    if hasattr(parent, "__path__"):  # a package: its modules too
        names |= {module.name for module in pkgutil.iter_modules(parent.__path__)}
    guess = difflib.get_close_matches(name, sorted(names), n=1)
    rest = target[len(parent_path) + 1 + len(name) :]
    fix = f"did you mean {parent_path + '.' + guess[0] + rest!r}?" if guess else TARGET_FIX
    return f"{parent_path!r} has no {name!r}; {fix}"


def _raised_in_hydra(err: BaseException) -> bool:
    """Raised by Hydra's own code (calling a target with arguments it does not take), not inside the target."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("hydra.")
