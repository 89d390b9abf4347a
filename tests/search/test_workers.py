"""Parallel evaluation: Ray workers give the same search as one process; Ray stays optional."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tests.search.helpers import Sphere, SphereFactory
from vlmerge.errors import VlmergeError
from vlmerge.search.checkpoint import read_trials
from vlmerge.search.fitness import Problem
from vlmerge.search.loop import CMAESSearch
from vlmerge.search.workers import LocalWorkers, make_workers


def test_two_ray_workers_equal_one_process(tmp_path):
    pytest.importorskip("ray")
    problem = Problem(x0=np.full(5, 0.5), factory=SphereFactory(sleep=0.01, vary_sleep=True))
    # budget 20, popsize 8: two full generations and a cut one, candidates finish out of order
    one = CMAESSearch(budget=20, seed=3, workers=1).run(problem, tmp_path / "one")
    two = CMAESSearch(budget=20, seed=3, workers=2).run(problem, tmp_path / "two")
    strip = lambda rows: [(r["generation"], r["index"], r["x"], r["fitness"], r["details"]) for r in rows]  # noqa: E731
    assert strip(read_trials(tmp_path / "two")) == strip(read_trials(tmp_path / "one"))
    assert (two.best_fitness, two.best_x.tolist()) == (one.best_fitness, one.best_x.tolist())


def test_missing_ray_is_one_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    problem = Problem(x0=np.full(3, 0.5), factory=SphereFactory())
    with pytest.raises(VlmergeError, match=r"needs Ray, which is not installed: pip install 'ray>=2.9'"):
        make_workers(problem, 2)


def test_local_workers_report_in_order_and_survive_failures():
    workers = LocalWorkers(Problem(x0=np.full(2, 0.5), fitness=Sphere(fail_above=0.5)))
    seen = []
    workers.map(
        [np.array([0.1, 0.2]), np.array([0.9, 0.2])], lambda i, o: seen.append((i, o.fitness, o.error))
    )
    assert seen[0][:2] == (0, pytest.approx(-(0.1**2 + 0.6**2))) and seen[0][2] is None
    assert seen[1][0] == 1 and seen[1][1] is None and "boom" in seen[1][2]
