"""A search that fails on bad input before writing anything of its own leaves no run dir behind.

Hydra creates the run dir (its `.hydra/` YAML files, the job log) before the command runs. `noting_fresh_run_dir`
notes, just before Hydra 1.3's `run_job` creates it, whether that dir is new; after a user error,
`remove_fresh_run_dir` removes it again when it holds only Hydra's files. A dir that existed before the run, one
holding anything else (a resumable checkpoint), and multirun's sweep dirs are never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")  # what Hydra writes in hydra.output_subdir


_fresh: dict[str, Path] = {}  # run mode only: the run dir and the topmost folder Hydra is about to create for it


@contextlib.contextmanager
def noting_fresh_run_dir():
    """Notes, just before Hydra creates a single run's output dir, whether it is new (multirun's sweep dirs
    are launched elsewhere and are never noted, so never removed)."""
    import hydra._internal.hydra as hydra_app

    original = getattr(hydra_app, "run_job", None)
    if original is None:
        yield
        return

    def run_job(*args, **kwargs):
        _fresh.clear()
        with contextlib.suppress(Exception):  # leave every error to Hydra's own run_job
            _note_fresh_run_dir(kwargs["config"], kwargs["job_dir_key"], kwargs.get("job_subdir_key"))
        return original(*args, **kwargs)

    hydra_app.run_job = run_job
    try:
        yield
    finally:
        hydra_app.run_job = original
        _fresh.clear()


def _note_fresh_run_dir(config, job_dir_key: str, job_subdir_key: str | None) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if job_subdir_key is not None:
        return
    hydra_config = HydraConfig.instance()
    before = hydra_config.cfg
    hydra_config.set_config(config)  # as run_job does before it reads the dir (${hydra:...} in it)
    try:
        run_dir = Path(os.path.abspath(str(OmegaConf.select(config, job_dir_key))))
    finally:
        hydra_config.cfg = before
    if run_dir.exists() or run_dir.is_symlink():
        return
    top = run_dir
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    _fresh.update(run_dir=run_dir, top=top)


def remove_fresh_run_dir() -> None:
    """After bad input: remove Hydra's files of this run (hydra.output_subdir's YAML files, the job log) and
    the folders made for it, when the run dir was created by this run and holds nothing else."""
    fresh = dict(_fresh)
    _fresh.clear()
    if not fresh:
        return
    with contextlib.suppress(Exception):  # never hide the user's error behind a cleanup problem
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return
        hydra_cfg = HydraConfig.get()
        run_dir = fresh["run_dir"]
        if hydra_cfg.mode != RunMode.RUN or Path(hydra_cfg.runtime.output_dir) != run_dir or not run_dir.is_dir():
            return
        expected = set()
        if hydra_cfg.output_subdir is not None:
            expected |= {run_dir / hydra_cfg.output_subdir / name for name in HYDRA_FILES}
        handlers = _log_files_in(run_dir)
        expected |= {Path(h.baseFilename) for h in handlers}
        folders = {p for file in expected for p in file.parents if run_dir in p.parents}
        found = {Path(root) / name for root, dirs, files in os.walk(run_dir) for name in [*dirs, *files]}
        if not found <= expected | folders:
            return  # the run wrote something of its own (or someone else did): keep everything
        for handler in handlers:
            handler.close()
            for logger in _loggers():
                logger.removeHandler(handler)
        for path in sorted(found, key=lambda p: len(p.parts), reverse=True):
            if path in folders:
                path.rmdir()
            else:
                path.unlink()
        folder = run_dir
        while True:
            folder.rmdir()  # OSError (not empty: something else arrived) ends it
            if folder == fresh["top"]:
                break
            folder = folder.parent


def _loggers() -> list[logging.Logger]:
    return [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                   if isinstance(lg, logging.Logger))]  # fmt: skip


def _log_files_in(run_dir: Path) -> list[logging.FileHandler]:
    handlers = {h for lg in _loggers() for h in lg.handlers if isinstance(h, logging.FileHandler)}
    return [h for h in handlers if run_dir in Path(h.baseFilename).parents]
