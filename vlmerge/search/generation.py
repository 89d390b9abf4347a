"""One generation: evaluate (reusing what a resumed run already logged), log, rank, keep the best.

Shared by the CMA-ES loop and the fixed re-scoring, so both write the same trials.jsonl rows:
{"trial", "generation", "index", "x", "recipe", "fitness" (null when failed), "details", "seconds", "error"}.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmerge.errors import VlmergeError
from vlmerge.search.checkpoint import TrialLog
from vlmerge.search.fitness import Outcome, Problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchResult:
    best_x: np.ndarray
    best_fitness: float
    best_details: dict
    best_recipe: dict | None  # Problem.describe(best_x)
    best_trial: int  # line of trials.jsonl (0-based)
    evaluations: int
    generations: int  # complete generations told to CMA
    run_dir: Path


class Lazy:
    """Workers are started only when something must be evaluated (a finished run resumes without Ray)."""

    def __init__(self, make):
        self.make, self.value = make, None

    def get(self):
        if self.value is None:
            self.value = self.make()
        return self.value

    def close(self) -> None:
        if self.value is not None:
            self.value.close()
            self.value = None


def evaluate_generation(
    xs: list[np.ndarray],
    generation: int,
    first_trial: int,
    carried: list[dict],
    workers: Lazy,
    trials: TrialLog,
    problem: Problem,
) -> list[Outcome]:
    """Outcomes of `xs` in order, each logged; carried successes with the same vector are reused."""
    outcomes: list[Outcome] = []
    for i, row in enumerate(carried[: len(xs)]):
        same = (
            row.get("generation") == generation and row.get("index") == i and row.get("fitness") is not None
        )
        if not same or np.asarray(row.get("x"), dtype=float).tolist() != xs[i].tolist():
            break
        outcomes.append(Outcome(float(row["fitness"]), row.get("details") or {}, row.get("seconds", 0.0)))
        trials.append(row)

    def record(k: int, outcome: Outcome) -> None:  # workers report in candidate order
        i = reused + k
        recipe = problem.describe(xs[i]) if problem.describe is not None else None
        trials.append(
            {
                "trial": first_trial + i,
                "generation": generation,
                "index": i,
                "x": xs[i],
                "recipe": recipe,
                "fitness": outcome.fitness,
                "details": outcome.details,
                "seconds": round(outcome.seconds, 3),
                "error": outcome.error,
            }
        )
        if outcome.error:
            log.warning("candidate %d of generation %d failed: %s", i, generation, outcome.error)
        outcomes.append(outcome)

    reused = len(outcomes)
    if reused < len(xs):
        workers.get().map(xs[reused:], record)
    return outcomes


def told_values(outcomes: list[Outcome]) -> list[float]:
    """What CMA minimises: -fitness; a failure ranks below every success of its generation."""
    ok = [-o.fitness for o in outcomes if o.fitness is not None]
    worst = max(ok) + 1.0 + abs(max(ok))
    return [-o.fitness if o.fitness is not None else worst for o in outcomes]


def update_best(best: dict | None, xs, outcomes, first_trial: int, generation: int) -> dict | None:
    if all(o.fitness is None for o in outcomes):
        errors = sorted({o.error for o in outcomes})
        raise VlmergeError(f"every candidate of generation {generation} failed; first error: {errors[0]}")
    for i, o in enumerate(outcomes):
        if o.fitness is not None and (best is None or o.fitness > best["fitness"]):
            best = {
                "x": xs[i].tolist(),
                "fitness": o.fitness,
                "details": dict(o.details),
                "trial": first_trial + i,
                "generation": generation,
                "index": i,
            }
    return best


def log_generation(generation: int, outcomes: list[Outcome], best: dict, done: int, budget: int) -> None:
    values = [o.fitness for o in outcomes if o.fitness is not None]
    failed = len(outcomes) - len(values)
    log.info(
        "generation %d: max %.4g mean %.4g%s | best %.4g | %d/%d evaluations",
        generation,
        max(values),
        float(np.mean(values)),
        f" ({failed} failed)" if failed else "",
        best["fitness"],
        done,
        budget,
    )


def best_json(best: dict, problem: Problem) -> dict:
    recipe = problem.describe(np.asarray(best["x"])) if problem.describe is not None else None
    return {**best, "recipe": recipe}


def make_result(
    best: dict, problem: Problem, evaluations: int, generations: int, run_dir: Path
) -> SearchResult:
    x = np.asarray(best["x"], dtype=float)
    recipe = problem.describe(x) if problem.describe is not None else None
    return SearchResult(
        x,
        float(best["fitness"]),
        dict(best["details"]),
        recipe,
        int(best["trial"]),
        evaluations,
        generations,
        run_dir,
    )
