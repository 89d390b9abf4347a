"""Console scripts: `vlmerge` (the search, also `python -m vlmerge`), `vlmerge-merge`, `vlmerge-eval`.

Bad input (VlmergeError) prints one `error:` line and exits with status 2, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from vlmerge.errors import VlmergeError


def config_dir() -> str:
    """`conf/` beside the package: vlmerge runs from a checkout (`pip install -e .`), whose conf/ and
    eval_data/ (the toy world, `${repo:...}` in the configs) a wheel would not carry."""
    candidate = Path(__file__).resolve().parent.parent / "conf"
    if candidate.is_dir():
        return str(candidate)
    raise VlmergeError("cannot find vlmerge's conf/ folder (install with `pip install -e .` from a checkout)")


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(cfg: DictConfig):
        try:
            return fn(cfg)
        except Exception as err:
            user_error = _user_error_in(err)
            if user_error is None:
                raise
            print(f"error: {user_error}", file=sys.stderr)
            sys.exit(user_error.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper


def _user_error_in(err: BaseException) -> VlmergeError | None:
    """The VlmergeError `err` is or was raised from (Hydra's instantiate wraps a constructor's refusal)."""
    while err is not None:
        if isinstance(err, VlmergeError):
            return err
        err = err.__cause__
    return None


@hydra.main(config_path=config_dir(), config_name="merge_cli", version_base="1.3")
@_user_errors
def merge_main(cfg: DictConfig) -> None:
    from vlmerge.merge.command import merge_command

    out = merge_command(cfg)
    print(f"wrote {out}")


@hydra.main(config_path=config_dir(), config_name="eval_cli", version_base="1.3")
@_user_errors
def eval_main(cfg: DictConfig) -> None:
    from vlmerge.eval.command import eval_command

    eval_command(cfg)


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
@_user_errors
def search_main(cfg: DictConfig) -> float | None:
    from vlmerge.run import run

    return run(cfg)
