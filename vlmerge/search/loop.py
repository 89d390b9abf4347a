"""The CMA-ES search loop (pycma ask/tell) with checkpoint/resume, failure handling and a hard budget.

- CMA-ES minimises, the fitness is maximised: CMA is told -fitness. A failed candidate (exception, NaN, inf)
  is logged with fitness null and its error, and told as worse than every successful candidate of its
  generation (CMA only uses ranks). A generation where every candidate fails stops the search (VlmergeError):
  it carries no information and usually means a broken setup.
- `budget` counts evaluations and is never exceeded: the last generation is cut to what is left; its
  candidates count for the best but are not told to CMA (an update needs a full population; the run ends).
  CMA's own stopping criteria are ignored: the search runs to the budget.
- CMA samples from its own RandomState (seeded by `seed`), pickled with the ES: a fitness that touches
  numpy's global RNG cannot change the trajectory, and a resumed run continues exactly where it was.
- Resume (`resume=true`, same run dir): the checkpoint holds the ES after the last complete generation (or,
  before generation 0 ends, the fresh ES, so that every resume compares its settings with the run's). The
  unfinished generation is asked again (same candidates); its logged successes are reused when the vectors
  match exactly, the rest are evaluated. The result equals an uninterrupted run's (fitness deterministic).
- Ctrl-C / SIGTERM: the checkpoint stays at the last complete generation; `SearchInterrupted` is raised
  (a VlmergeError with exit code 130: the CLI prints one line).
"""

from __future__ import annotations

import logging
import math
import pickle
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmerge.errors import VlmergeError
from vlmerge.search.checkpoint import (
    BEST,
    CHECKPOINT,
    TRIALS,
    TrialLog,
    load_checkpoint,
    save_checkpoint,
    write_json,
)
from vlmerge.search.fitness import Problem
from vlmerge.search.generation import (
    Lazy,
    SearchResult,
    best_json,
    evaluate_generation,
    log_generation,
    make_result,
    told_values,
    update_best,
)
from vlmerge.search.workers import make_workers

log = logging.getLogger(__name__)


class SearchInterrupted(VlmergeError):
    """Ctrl-C or SIGTERM: the run dir is consistent; `resume=true` continues it."""

    exit_code = 130


@dataclass(frozen=True)
class CMAESSearch:
    budget: int = 100
    popsize: int | None = None  # None: pycma's 4 + floor(3 ln n)
    sigma0: float = 1 / 6
    workers: int = 1
    seed: int = 0
    resume: bool = False
    ray_address: str | None = None  # None: a local Ray; "auto" or "ray://host:10001": an existing cluster
    gpus_per_worker: float | None = None  # None: 1 where the cluster has GPUs, else 0

    def __post_init__(self):
        checks = (
            ("budget", isinstance(self.budget, int) and self.budget >= 1, ">= 1"),
            (
                "popsize",
                self.popsize is None or (isinstance(self.popsize, int) and self.popsize >= 2),
                ">= 2",
            ),
            ("sigma0", isinstance(self.sigma0, (int, float)) and 0 < self.sigma0 < math.inf, "> 0"),
            ("workers", isinstance(self.workers, int) and self.workers >= 1, ">= 1"),
            ("seed", isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**32,
             "an integer in 0..2**32-1 (it seeds CMA-ES)"),
        )
        for key, ok, want in checks:
            if not ok:
                raise VlmergeError(f"search.{key} = {getattr(self, key)!r}: must be {want}")

    def _fingerprint(self, problem: Problem) -> dict:
        return {
            "dimension": int(problem.x0.size),
            "x0": problem.x0.tolist(),
            "popsize": self.popsize,
            "sigma0": float(self.sigma0),
            "seed": self.seed,
        }

    def _new_es(self, problem: Problem):
        import cma

        rng = np.random.RandomState(self.seed)
        opts = {"randn": rng.randn, "seed": math.nan, "verbose": -9, "verb_log": 0, "verb_disp": 0}
        if self.popsize is not None:
            opts["popsize"] = self.popsize
        return cma.CMAEvolutionStrategy(problem.x0.tolist(), float(self.sigma0), opts)

    def _save(self, run_dir: Path, es, best, generation: int, evaluations: int, problem: Problem) -> None:
        state = {"es": es.pickle_dumps(), "best": best, "generation": generation, "evaluations": evaluations,
                 "fingerprint": self._fingerprint(problem)}  # fmt: skip
        save_checkpoint(run_dir, state)

    def run(self, problem: Problem, run_dir: Path | str) -> SearchResult:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        trials = TrialLog(run_dir / TRIALS)
        state = load_checkpoint(run_dir) if self.resume else None
        if not self.resume and ((run_dir / CHECKPOINT).exists() or trials.read()):
            raise VlmergeError(
                f"{run_dir} already holds a search; pass resume=true to continue it, or use a new run dir"
            )
        if state is not None:
            _check_resumable(state["fingerprint"], self._fingerprint(problem), run_dir)
            es, best = pickle.loads(state["es"]), state["best"]
            generation, evaluations = state["generation"], state["evaluations"]
            log.info("resuming %s at generation %d (%d evaluations)", run_dir, generation, evaluations)
        else:  # checkpointed before generation 0: a resume of a run cut short there checks its settings too
            es, best, generation, evaluations = self._new_es(problem), None, 0, 0
            self._save(run_dir, es, best, generation, evaluations, problem)
        rows = trials.read()
        if len(rows) < evaluations:
            raise VlmergeError(
                f"{run_dir / TRIALS} has {len(rows)} trials, the checkpoint counts {evaluations}: "
                "the run dir is damaged"
            )
        carried = rows[evaluations:]
        trials.rewrite(rows[:evaluations])
        workers = Lazy(
            lambda: make_workers(
                problem, self.workers, address=self.ray_address, gpus_per_worker=self.gpus_per_worker
            )
        )
        try:
            with sigterm_as_interrupt():
                while evaluations < self.budget:
                    xs = [np.asarray(x, dtype=float) for x in es.ask()]
                    n = min(len(xs), self.budget - evaluations)
                    outcomes = evaluate_generation(
                        xs[:n], generation, evaluations, carried, workers, trials, problem
                    )
                    carried = []
                    best = update_best(best, xs, outcomes, evaluations, generation)
                    evaluations += n
                    log_generation(generation, outcomes, best, evaluations, self.budget)
                    if n < len(xs):
                        break
                    es.tell([x.tolist() for x in xs], told_values(outcomes))
                    generation += 1
                    trials.sync()
                    self._save(run_dir, es, best, generation, evaluations, problem)
                    write_json(run_dir / BEST, best_json(best, problem))
        except KeyboardInterrupt:
            raise SearchInterrupted(
                f"search interrupted in generation {generation}; {run_dir / CHECKPOINT} holds {generation} "
                f"complete generations: continue with resume=true and the same run dir"
            ) from None
        finally:
            trials.close()
            workers.close()
        write_json(run_dir / BEST, best_json(best, problem))
        return make_result(best, problem, evaluations, generation, run_dir)


def _check_resumable(saved: dict, now: dict, run_dir: Path) -> None:
    for key in saved:
        if saved[key] != now[key]:
            shown = lambda v: f"a {len(v)}-vector" if isinstance(v, list) else repr(v)  # noqa: E731
            raise VlmergeError(
                f"cannot resume {run_dir}: {key} was {shown(saved[key])} in the checkpoint, "
                f"now {shown(now[key])} (the genome, x0, search.popsize, sigma0 and seed must "
                "match)"
            )


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (schedulers, `kill`) stops the search like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
