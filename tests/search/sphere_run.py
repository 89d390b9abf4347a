"""A search on the slow sphere, run as a subprocess by the kill/interrupt tests (mirrors the CLI's handling).

python -m tests.search.sphere_run RUN_DIR BUDGET SLEEP RESUME
"""

from __future__ import annotations

import sys

import numpy as np

from tests.search.helpers import Sphere
from vlmerge.errors import VlmergeError
from vlmerge.search.fitness import Problem
from vlmerge.search.loop import CMAESSearch

SEED, POPSIZE, DIM = 7, 6, 5


def search(budget: int, resume: bool) -> CMAESSearch:
    return CMAESSearch(budget=budget, popsize=POPSIZE, seed=SEED, resume=resume)


def problem(sleep: float) -> Problem:
    return Problem(x0=np.full(DIM, 0.5), fitness=Sphere(sleep=sleep))


if __name__ == "__main__":
    run_dir, budget, sleep, resume = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
    try:
        result = search(budget, resume).run(problem(sleep), run_dir)
    except VlmergeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    print(f"best {result.best_fitness!r}")
