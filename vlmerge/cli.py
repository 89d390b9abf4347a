"""Console scripts: `vlmerge` (the search, also `python -m vlmerge`), `vlmerge-merge`, `vlmerge-eval`.

Bad input ends in one `error:` line and exit status 2, never a traceback: a VlmergeError raised by the command
(also from inside Hydra's instantiate), and Hydra's own refusals of the command line (an unknown key, a config
group option that does not exist, an override that does not parse) and of the config's `_target_`s (one that names
no class or function, refused before the command starts; arguments a target does not take, for a `_partial_` node
also before the command starts).
HYDRA_FULL_ERROR=1 gives Hydra's traceback (not for a `_target_` that names nothing).
A search that fails on bad input before writing anything of its own removes the run dir Hydra made for it.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from vlmerge.errors import VlmergeError
from vlmerge.fresh_run_dir import noting_fresh_run_dir, remove_fresh_run_dir
from vlmerge.hydra_errors import (
    bad_partial_arguments,
    bad_target,
    hydra_errors_in_one_line,
    instantiation_error_line,
)


def config_dir() -> str:
    """`conf/` beside the package: vlmerge runs from a checkout (`pip install -e .`), whose conf/ and
    eval_data/ (the toy world, `${repo:...}` in the configs) a wheel would not carry."""
    candidate = Path(__file__).resolve().parent.parent / "conf"
    if candidate.is_dir():
        return str(candidate)
    raise VlmergeError("cannot find vlmerge's conf/ folder (install with `pip install -e .` from a checkout)")


def config_options(group: str) -> list[str]:
    """The options of a config group (conf/`group`/NAME.yaml), sorted: for messages that list them."""
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(cfg: DictConfig):
        try:
            # before the command builds anything (instantiate says it in many lines, a partial's call in a traceback)
            refused = bad_target(cfg) or bad_partial_arguments(cfg)
            if refused:
                raise VlmergeError(refused)
            return fn(cfg)
        except Exception as err:
            user_error = _user_error_in(err, cfg)
            if user_error is None:
                raise
            remove_fresh_run_dir()
            print(f"error: {user_error}", file=sys.stderr)
            sys.exit(user_error.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper


_TASK_CODE = _user_errors(lambda cfg: None).__code__  # the frame every command runs under


def _user_error_in(err: BaseException, cfg: DictConfig) -> VlmergeError | None:
    """The VlmergeError `err` is or was raised from (Hydra's instantiate wraps a constructor's refusal), or one
    for a config node Hydra's instantiate refused before calling its target (arguments it does not take)."""
    line = instantiation_error_line(err, cfg)
    while err is not None:
        if isinstance(err, VlmergeError):
            return err
        err = err.__cause__
    return None if line is None else VlmergeError(line)


def _hydra_app(config_name: str):
    """hydra.main on conf/`config_name`, with Hydra's own errors in one line and a fresh run dir noted."""

    def decorate(fn):
        app = hydra.main(config_path=config_dir(), config_name=config_name, version_base="1.3")(_user_errors(fn))

        @functools.wraps(fn)
        def main(*args, **kwargs):
            with hydra_errors_in_one_line(_TASK_CODE), noting_fresh_run_dir():
                return app(*args, **kwargs)

        return main

    return decorate


# --- the commands -------------------------------------------------------------------------------------------


@_hydra_app("merge_cli")
def merge_main(cfg: DictConfig) -> None:
    from vlmerge.merge.command import merge_command

    out = merge_command(cfg)
    print(f"wrote {out}")


@_hydra_app("eval_cli")
def eval_main(cfg: DictConfig) -> None:
    from vlmerge.eval.command import eval_command

    eval_command(cfg)


@_hydra_app("config")
def search_main(cfg: DictConfig) -> float | None:
    from vlmerge.run import run

    return run(cfg)
