"""Re-score given recipes with no search (baselines, a recipe from another run, a hand-written one).

Each recipe is encoded by the genome (it must be expressible by it: `Genome.encode` says what is not) and
scored by the same fitness as the search, so the numbers are comparable with a search's trials.jsonl. Before the
model loads, `check_recipes` refuses a recipe that vlmerge-merge would refuse with this pool, or that the genome
cannot express, naming its file.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vlmerge.errors import VlmergeError
from vlmerge.merge.merger import check_sources
from vlmerge.merge.recipe import Recipe, load_recipe
from vlmerge.models.pool import Pool
from vlmerge.search.checkpoint import BEST, TRIALS, TrialLog, write_json
from vlmerge.search.fitness import Problem
from vlmerge.search.generation import (
    Lazy,
    SearchResult,
    best_json,
    evaluate_generation,
    make_result,
    update_best,
)
from vlmerge.search.loop import SearchInterrupted, sigterm_as_interrupt
from vlmerge.search.workers import make_workers
from vlmerge.user_input import string_list

if TYPE_CHECKING:
    from vlmerge.merge.genome import Genome


@dataclass(frozen=True)
class FixedSearch:
    recipes: Sequence[str] = ()  # recipe YAML files, scored in this order (generation 0, index = position)
    workers: int = 1
    resume: bool = False  # reuse the successful trials already logged in the run dir
    ray_address: str | None = None
    gpus_per_worker: float | None = None
    budget: int | None = None  # at most this many evaluations (experiments set one for the search)

    def __post_init__(self):
        recipes = string_list(self.recipes, "search.recipes", "search.recipes=[A.yaml,B.yaml]", item=(str, PathLike))
        object.__setattr__(self, "recipes", tuple(map(str, recipes)))
        if not self.recipes:
            raise VlmergeError("search.recipes is empty: list the recipe files to score")
        if self.budget is not None and len(self.recipes) > self.budget:
            raise VlmergeError(
                f"search.recipes lists {len(self.recipes)} recipes but search.budget = {self.budget}: "
                "raise the budget or list fewer recipes"
            )

    def check_recipes(self, pool: Pool, genome: Genome) -> None:
        """Refuse a recipe file that sets a parameter its op ignores (`Recipe.check_read`), does not fit the
        pool (`merger.check_sources`: its sources, rules that select no tensor of the target tower), as
        vlmerge-merge would, or that the genome cannot express (`Genome.encode`: another op, values that differ
        within a genome cell), as `run` would, naming the file; vlmerge's run calls it before the model loads."""
        for path in self.recipes:
            recipe = load_recipe(path)
            recipe.check_read()
            check_sources(pool, recipe, where=f"recipe {path}")
            encoded(path, recipe, functools.partial(genome.encode, depth=pool.plan.depth))

    def run(self, problem: Problem, run_dir: Path | str) -> SearchResult:
        if problem.encode is None:
            raise VlmergeError("re-scoring recipes needs Problem.encode (use Problem.for_genome)")
        xs = [encoded(path, load_recipe(path), problem.encode) for path in self.recipes]
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        trials = TrialLog(run_dir / TRIALS)
        carried = trials.read()
        if carried and not self.resume:
            raise VlmergeError(
                f"{run_dir} already holds trials; pass resume=true to reuse them, or use a new run dir"
            )
        trials.rewrite([])
        workers = Lazy(
            lambda: make_workers(
                problem, self.workers, address=self.ray_address, gpus_per_worker=self.gpus_per_worker
            )
        )
        try:
            with sigterm_as_interrupt():
                outcomes = evaluate_generation(xs, 0, 0, carried, workers, trials, problem)
        except KeyboardInterrupt:
            raise SearchInterrupted(
                f"re-scoring interrupted; resume=true reuses the trials in {run_dir}"
            ) from None
        finally:
            trials.close()
            workers.close()
        best = update_best(None, xs, outcomes, 0, 0)
        write_json(run_dir / BEST, best_json(best, problem))
        return make_result(best, problem, len(xs), 1, run_dir)


def encoded(path: str, recipe: Recipe, encode: Callable[[Recipe], np.ndarray]) -> np.ndarray:
    """`encode(recipe)`, the genes of the recipe file at `path`; what the genome cannot express in it is
    refused naming the file."""
    try:
        return np.asarray(encode(recipe), dtype=float)
    except VlmergeError as err:
        raise VlmergeError(f"recipe {path}: {err}") from None
