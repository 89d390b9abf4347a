"""The run directory of a search: `trials.jsonl` (every evaluation), `checkpoint.pkl`, `best.json`.

The checkpoint is written after every complete generation, atomically (temp file + os.replace), and counts
the trial lines it covers; lines after that count belong to an unfinished generation and are re-checked on
resume. Trial lines are flushed as they come and fsynced before the checkpoint that counts them.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vlmerge.errors import VlmergeError

TRIALS = "trials.jsonl"
CHECKPOINT = "checkpoint.pkl"
BEST = "best.json"
CHECKPOINT_VERSION = 1


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, state: Mapping[str, Any]) -> None:
    atomic_write(run_dir / CHECKPOINT, pickle.dumps({"version": CHECKPOINT_VERSION, **state}))


def load_checkpoint(run_dir: Path) -> dict | None:
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = pickle.loads(path.read_bytes())
    except Exception as err:  # noqa: BLE001 (any unpickling problem means the same thing to the user)
        raise VlmergeError(f"{path}: cannot read the checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise VlmergeError(f"{path}: not a vlmerge search checkpoint (version {CHECKPOINT_VERSION})")
    return state


def write_json(path: Path, value: Any) -> None:
    atomic_write(path, (json.dumps(plain(value), indent=2, ensure_ascii=False) + "\n").encode())


def plain(value: Any) -> Any:
    """JSON-able: numpy values to Python, non-finite floats to None, unknown objects to their str."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


class TrialLog:
    """Append-only JSON lines, one per evaluation, in (generation, candidate index) order."""

    def __init__(self, path: Path):
        self.path = path
        self._file = None

    def read(self) -> list[dict]:
        """Complete lines only: a line cut short by a kill is dropped."""
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines(keepends=True):
            if not line.endswith("\n"):
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return rows

    def rewrite(self, rows: list[dict]) -> None:
        self.close()
        atomic_write(self.path, "".join(_line(r) for r in rows).encode())

    def append(self, row: Mapping[str, Any]) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(_line(row))
        self._file.flush()

    def sync(self) -> None:
        if self._file is not None:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _line(row: Mapping[str, Any]) -> str:
    return json.dumps(plain(row), ensure_ascii=False) + "\n"


def read_trials(run_dir: Path | str) -> list[dict]:
    return TrialLog(Path(run_dir) / TRIALS).read()
