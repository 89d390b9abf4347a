"""What a searcher needs from the rest of vlmerge: a fitness to maximise and a problem to search.

The search is generic: it sees vectors and numbers. `run()` wires a genome, a merger and an evaluator into a
`Fitness` (vector -> Evaluation) and describes vectors as recipes for the trial log (`Problem.for_genome`).
A fitness must be deterministic (same vector -> same value): resume and parallel runs rely on it.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from vlmerge.errors import VlmergeError


@dataclass(frozen=True)
class Evaluation:
    """The score of one candidate (higher is better) and the metric details to log with it."""

    fitness: float
    details: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Fitness(Protocol):
    def __call__(self, x: np.ndarray) -> Evaluation: ...


FitnessFactory = Callable[[], Fitness]  # picklable (Ray ships it to each worker, which builds its own models)


@dataclass(frozen=True)
class Problem:
    """A search problem: the start point, how to score a vector, how to describe one for the logs.

    Give `fitness` (in-process, workers = 1) or `factory` (anything that builds one; needed for workers > 1,
    where every worker calls it once). `describe` turns a vector into a JSON-able dict (the decoded recipe);
    `encode` turns a recipe into a vector (for re-scoring given recipes).
    """

    x0: np.ndarray
    fitness: Fitness | None = None
    factory: FitnessFactory | None = None
    describe: Callable[[np.ndarray], dict] | None = None
    encode: Callable[[Any], np.ndarray] | None = None

    def __post_init__(self):
        object.__setattr__(self, "x0", np.asarray(self.x0, dtype=float).reshape(-1))
        if self.x0.size == 0:
            raise VlmergeError("nothing to search: the genome has no genes (every value is frozen or fixed)")
        if (self.fitness is None) == (self.factory is None):
            raise VlmergeError("search problem: give exactly one of `fitness` and `factory`")

    def make_fitness(self) -> Fitness:
        return self.fitness if self.fitness is not None else self.factory()

    @classmethod
    def for_genome(
        cls,
        genome,
        depth: int,
        sources: Sequence[str],
        *,
        fitness: Fitness | None = None,
        factory: FitnessFactory | None = None,
        seed: int = 0,
        start=None,
    ) -> Problem:
        """The usual problem, from a `vlmerge.merge.genome.Genome`: x0 = 0.5 everywhere, or the genes of the
        recipe `start` (a Recipe the genome can express); trials log the decoded recipe."""
        sources = tuple(sources)
        if start is not None and tuple(start.sources) != sources:
            raise VlmergeError(
                f"start recipe sources {list(start.sources)} differ from the pool's {list(sources)}"
            )
        return cls(
            x0=genome.x0(depth, sources) if start is None else genome.encode(start, depth),
            fitness=fitness,
            factory=factory,
            describe=lambda x: genome.decode(x, depth, sources, seed=seed).to_dict(),
            encode=lambda recipe: genome.encode(recipe, depth),
        )


@dataclass(frozen=True)
class Outcome:
    """One evaluation as logged: fitness None when the candidate failed (exception, NaN, inf)."""

    fitness: float | None
    details: Mapping[str, Any]
    seconds: float
    error: str | None = None


def evaluate_safely(fitness: Fitness, x: np.ndarray) -> Outcome:
    """Score one candidate; a failure becomes an Outcome with the error text, never an exception.

    KeyboardInterrupt and SystemExit pass through (they stop the search, they are not the candidate's fault).
    """
    start = time.perf_counter()
    try:
        result = fitness(np.asarray(x, dtype=float))
        value, details = (result.fitness, result.details) if isinstance(result, Evaluation) else (result, {})
        value = float(value)
        if not math.isfinite(value):
            return Outcome(None, dict(details), time.perf_counter() - start, f"non-finite fitness {value}")
        return Outcome(value, dict(details), time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 (a failing candidate must not stop the search)
        text = "".join(traceback.format_exception_only(type(err), err)).strip()
        return Outcome(None, {}, time.perf_counter() - start, text)
