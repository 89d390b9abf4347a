"""Evaluate a model on a task split, or score predictions made elsewhere: answers, metric values, per item.

`evaluate` is what the search calls for every candidate: the task keeps its data (loaded and checked once),
the bundle keeps the model, and nothing derived from the weights survives a call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vlmerge.errors import VlmergeError
from vlmerge.eval.data import MAX_LISTED, Item
from vlmerge.eval.generate import generate
from vlmerge.eval.loading import ModelBundle
from vlmerge.eval.metrics import MetricResult
from vlmerge.eval.task import Task
from vlmerge.user_input import utf8_lines


@dataclass(frozen=True)
class EvalResult:
    """Scores of one split: aggregate values, one prediction and one per-item score dict per item."""

    task: str
    split: str
    items: tuple[Item, ...]
    predictions: tuple[str, ...]  # post-processed answers, the metric's input ("" for skipped items)
    outputs: tuple[str | None, ...]  # raw generations (None: skipped item, or scored from a file)
    metric: MetricResult
    fitness_key: str
    skipped: tuple[str, ...] = ()  # ids of items with unreadable images, scored as empty predictions
    seconds: float = 0.0

    @property
    def values(self) -> dict[str, float]:
        return self.metric.values

    @property
    def fitness(self) -> float:
        return float(self.metric.values[self.fitness_key])

    @property
    def n_items(self) -> int:
        return len(self.items)

    def rows(self) -> list[dict]:
        """One JSON-ready record per item, in split order (the lines of predictions.jsonl)."""
        skipped = set(self.skipped)
        per_item = self.metric.per_item or [{}] * len(self.items)
        return [
            {
                "id": item.id,
                "prediction": prediction,
                "output": output,
                "answers": list(item.answers),
                "question": item.question,
                "skipped": item.id in skipped,
                "scores": scores,
            }
            for item, prediction, output, scores in zip(self.items, self.predictions, self.outputs, per_item)
        ]


def evaluate(bundle: ModelBundle, task: Task, split: str = "search", *, progress: bool = False) -> EvalResult:
    """Generate on every item of `split` ("search", "heldout" or a split name) and score the answers."""
    start = time.perf_counter()
    task.check_fitness_key()
    prepared = task.prepare(split)
    todo = [item for item in prepared.items if item.id not in prepared.bad_ids]
    prompts = [task.build_prompt(item, bundle) for item in todo]
    outputs = generate(
        bundle,
        prompts,
        [item.image for item in todo],
        task.generation,
        progress=progress,
        desc=f"{task.name}/{prepared.name}",
    )
    by_id = dict(zip((item.id for item in todo), outputs))
    raw = tuple(by_id.get(item.id) for item in prepared.items)
    predictions = tuple("" if out is None else task.postprocess(out) for out in raw)
    metric = task.score(predictions, prepared.items)
    skipped = tuple(item.id for item in prepared.items if item.id in prepared.bad_ids)
    return EvalResult(
        task.name,
        prepared.name,
        prepared.items,
        predictions,
        raw,
        metric,
        task.fitness_key,
        skipped,
        time.perf_counter() - start,
    )


def score_predictions(
    task: Task, split: str, predictions: Mapping[str, str], *, source: str = "predictions"
) -> EvalResult:
    """Score answers produced elsewhere (id -> text) against `split`; every id must match exactly once."""
    start = time.perf_counter()
    task.check_fitness_key()
    name = task.split_name(split)
    items = tuple(task.dataset.split(name))
    known = {item.id for item in items}
    unknown = sorted(set(predictions) - known)
    missing = [item.id for item in items if item.id not in predictions]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} id(s) not in the split: {_listed(unknown)}")
        if missing:
            parts.append(f"{len(missing)} item(s) of the split have no prediction: {_listed(missing)}")
        raise VlmergeError(f"{source} does not match task {task.name!r} split {name!r}: " + "; ".join(parts))
    answers = tuple(task.postprocess(predictions[item.id]) for item in items)
    metric = task.score(answers, items)
    return EvalResult(
        task.name,
        name,
        items,
        answers,
        tuple(None for _ in items),
        metric,
        task.fitness_key,
        (),
        time.perf_counter() - start,
    )


def read_predictions(path: Path | str) -> dict[str, str]:
    """id -> prediction from a JSONL file of `{"id": ..., "prediction": "..."}` lines (other keys ignored)."""
    path = Path(path)
    if not path.is_file():
        raise VlmergeError(f"predictions file not found: {path}")
    out: dict[str, str] = {}
    duplicates = []
    for lineno, line in utf8_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise VlmergeError(f"{where}: invalid JSON ({error.msg})") from None
        if not isinstance(row, dict) or "id" not in row or "prediction" not in row:
            raise VlmergeError(f'{where}: expected an object with "id" and "prediction"')
        if not isinstance(row["prediction"], str) or isinstance(row["id"], (bool, dict, list)):
            raise VlmergeError(f'{where}: "id" must be a string or number and "prediction" a string')
        key = str(row["id"])
        if key in out:
            duplicates.append(key)
        out[key] = row["prediction"]
    if duplicates:
        raise VlmergeError(f"{path}: duplicate id(s) {_listed(duplicates)}")
    if not out:
        raise VlmergeError(f"{path}: no predictions")
    return out


def _listed(ids: list[str]) -> str:
    more = f" and {len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else ""
    return ", ".join(ids[:MAX_LISTED]) + more
