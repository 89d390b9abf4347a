"""The CMA-ES loop: optimum of a known function, budget, failures, resume rules, fixed re-scoring, configs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.search.helpers import OPTIMUM, Sphere
from vlmerge.errors import VlmergeError
from vlmerge.merge.genome import Genome
from vlmerge.search.checkpoint import BEST, CHECKPOINT, read_trials
from vlmerge.search.fitness import Evaluation, Outcome, Problem
from vlmerge.search.fixed import FixedSearch
from vlmerge.search.loop import CMAESSearch, SearchInterrupted, told_values

CONF = Path(__file__).resolve().parents[2] / "conf" / "search"


def sphere_problem(fitness=None, dim: int = 5) -> Problem:
    return Problem(x0=np.full(dim, 0.5), fitness=fitness or Sphere())


def test_finds_the_optimum_of_a_shifted_sphere(tmp_path):
    result = CMAESSearch(budget=280, seed=0).run(sphere_problem(), tmp_path)
    assert np.abs(result.best_x - OPTIMUM).max() < 0.01
    assert result.evaluations == 280 and result.generations == 35  # popsize 4 + floor(3 ln 5) = 8
    rows = read_trials(tmp_path)
    assert len(rows) == 280 and result.best_fitness == max(r["fitness"] for r in rows)
    assert rows[result.best_trial]["x"] == result.best_x.tolist()
    assert json.loads((tmp_path / BEST).read_text())["fitness"] == result.best_fitness


def test_budget_is_never_exceeded(tmp_path):
    fitness = Sphere()
    result = CMAESSearch(budget=10, popsize=4, seed=1).run(sphere_problem(fitness), tmp_path)
    rows = read_trials(tmp_path)
    assert fitness.calls == 10 and result.evaluations == 10 and len(rows) == 10
    assert [(r["generation"], r["index"]) for r in rows] == [(g, i) for g in range(3) for i in range(4)][:10]
    assert [r["trial"] for r in rows] == list(range(10))
    state = pickle.loads((tmp_path / CHECKPOINT).read_bytes())
    assert state["generation"] == 2 and state["evaluations"] == 8  # the cut generation is not told


def test_failing_and_nan_candidates_get_the_worst_fitness_and_are_logged(tmp_path):
    fitness = Sphere(fail_above=0.62, nan_below=0.38)
    result = CMAESSearch(budget=48, popsize=8, seed=2).run(sphere_problem(fitness), tmp_path)
    rows = read_trials(tmp_path)
    raised = [r for r in rows if r["error"] and "boom" in r["error"]]
    nans = [r for r in rows if r["error"] and "non-finite fitness nan" in r["error"]]
    assert raised and nans and len(rows) == 48
    assert all(r["fitness"] is None for r in raised + nans)
    assert raised[0]["error"].startswith("RuntimeError: boom at x0=")
    assert all(0.38 <= r["x"][0] <= 0.62 for r in rows if r["fitness"] is not None)
    assert 0.38 <= result.best_x[0] <= 0.62


def test_failures_rank_below_every_success():
    outcomes = [
        Outcome(-3.0, {}, 0.0),
        Outcome(None, {}, 0.0, "x"),
        Outcome(5.0, {}, 0.0),
        Outcome(-10.0, {}, 0.0),
    ]
    told = told_values(outcomes)
    assert told[0] == 3.0 and told[2] == -5.0 and told[3] == 10.0
    assert told[1] > max(told[0], told[2], told[3])


def test_a_generation_where_everything_fails_stops_the_search(tmp_path):
    with pytest.raises(
        VlmergeError, match="every candidate of generation 0 failed; first error: RuntimeError: boom"
    ):
        CMAESSearch(budget=20, popsize=4).run(sphere_problem(Sphere(fail_above=-1.0)), tmp_path)


def test_keyboard_interrupt_keeps_the_last_complete_generation_and_resume_matches(tmp_path):
    class InterruptOnce(Sphere):
        def __call__(self, x):
            if self.calls == 13:
                self.calls += 1
                raise KeyboardInterrupt
            return super().__call__(x)

    CMAESSearch(budget=30, popsize=6, seed=4).run(sphere_problem(), tmp_path / "straight")
    run_dir = tmp_path / "interrupted"
    with pytest.raises(SearchInterrupted, match="2 complete generations: continue with resume=true") as info:
        CMAESSearch(budget=30, popsize=6, seed=4).run(sphere_problem(InterruptOnce()), run_dir)
    assert info.value.exit_code == 130
    assert pickle.loads((run_dir / CHECKPOINT).read_bytes())["evaluations"] == 12
    result = CMAESSearch(budget=30, popsize=6, seed=4, resume=True).run(sphere_problem(), run_dir)
    strip = lambda rows: [(r["x"], r["fitness"]) for r in rows]  # noqa: E731
    assert strip(read_trials(run_dir)) == strip(read_trials(tmp_path / "straight"))
    assert result.evaluations == 30


def test_resume_extends_a_finished_run_like_a_longer_run(tmp_path):
    CMAESSearch(budget=30, popsize=8, seed=5).run(sphere_problem(), tmp_path / "long")
    CMAESSearch(budget=20, popsize=8, seed=5).run(sphere_problem(), tmp_path / "short")
    again = Sphere()
    CMAESSearch(budget=20, popsize=8, seed=5, resume=True).run(sphere_problem(again), tmp_path / "short")
    assert again.calls == 0  # finished: the cut generation's trials are reused, nothing is evaluated
    more = Sphere()
    result = CMAESSearch(budget=30, popsize=8, seed=5, resume=True).run(
        sphere_problem(more), tmp_path / "short"
    )
    assert more.calls == 10  # the 4 already-scored candidates of generation 2 are reused
    assert read_trials(tmp_path / "short") == [
        {**r, "seconds": s["seconds"]}
        for r, s in zip(read_trials(tmp_path / "long"), read_trials(tmp_path / "short"))
    ]
    assert result.evaluations == 30


def test_refuses_to_overwrite_or_to_resume_with_other_settings(tmp_path):
    CMAESSearch(budget=8, popsize=4).run(sphere_problem(), tmp_path)
    with pytest.raises(VlmergeError, match="already holds a search; pass resume=true"):
        CMAESSearch(budget=8, popsize=4).run(sphere_problem(), tmp_path)
    with pytest.raises(VlmergeError, match="sigma0 was 0.16"):
        CMAESSearch(budget=8, popsize=4, sigma0=0.3, resume=True).run(sphere_problem(), tmp_path)
    with pytest.raises(VlmergeError, match="dimension was 5"):
        CMAESSearch(budget=8, popsize=4, resume=True).run(sphere_problem(dim=4), tmp_path)


def test_a_run_cut_short_in_generation_0_resumes_only_with_its_own_settings(tmp_path):
    """A budget below the population ends in generation 0, before any generation completes: the run dir
    still holds a checkpoint, so a resume with other settings is refused instead of starting over."""
    CMAESSearch(budget=3, popsize=4, seed=1).run(sphere_problem(), tmp_path)
    logged = read_trials(tmp_path)
    with pytest.raises(VlmergeError, match="seed was 1"):
        CMAESSearch(budget=3, popsize=4, seed=5, resume=True).run(sphere_problem(), tmp_path)
    assert read_trials(tmp_path) == logged
    again = CMAESSearch(budget=3, popsize=4, seed=1, resume=True).run(sphere_problem(), tmp_path)
    assert [r["x"] for r in read_trials(tmp_path)] == [r["x"] for r in logged] and again.evaluations == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 0}, "search.budget = 0"),
        ({"popsize": 1}, "search.popsize"),
        ({"sigma0": -1.0}, "sigma0"),
        ({"workers": 0}, "search.workers"),
        ({"seed": -1}, r"search.seed = -1: must be an integer in 0..2\*\*32-1"),  # numpy refuses it mid-run
        ({"seed": 2**32}, "search.seed = 4294967296"),
        ({"seed": 1.5}, "search.seed = 1.5"),
    ],
)
def test_bad_search_settings(kwargs, message):
    with pytest.raises(VlmergeError, match=message):
        CMAESSearch(**kwargs)


def test_problem_needs_genes_and_one_fitness(tmp_path):
    with pytest.raises(VlmergeError, match="nothing to search"):
        Problem(x0=np.zeros(0), fitness=Sphere())
    with pytest.raises(VlmergeError, match="exactly one of `fitness` and `factory`"):
        Problem(x0=np.zeros(3))
    with pytest.raises(VlmergeError, match="needs a picklable fitness factory"):
        CMAESSearch(budget=4, workers=2).run(sphere_problem(), tmp_path / "run")


def genome_problem(fitness) -> tuple[Genome, Problem]:
    genome = Genome(op="ties", groups=2)
    return genome, Problem.for_genome(genome, 4, ("target", "ja"), fitness=fitness, seed=9)


def test_trials_log_the_decoded_recipe(tmp_path):
    genome, problem = genome_problem(lambda x: Evaluation(float(-np.sum(x**2)), {"rouge": 1.5}))
    result = CMAESSearch(budget=5, seed=3).run(problem, tmp_path)
    row = read_trials(tmp_path)[0]
    assert row["recipe"] == genome.decode(row["x"], 4, ("target", "ja"), seed=9).to_dict()
    assert row["details"] == {"rouge": 1.5} and row["error"] is None and row["seconds"] >= 0
    assert result.best_recipe == genome.decode(result.best_x, 4, ("target", "ja"), seed=9).to_dict()


def test_problem_can_start_from_a_recipe():
    genome = Genome(op="ties", groups=2)
    start = genome.decode(np.linspace(0.1, 0.8, 8), 4, ("target", "ja"))
    problem = Problem.for_genome(genome, 4, ("target", "ja"), fitness=Sphere(), start=start)
    assert np.allclose(problem.x0, np.linspace(0.1, 0.8, 8))
    with pytest.raises(VlmergeError, match="start recipe sources"):
        Problem.for_genome(genome, 4, ("target", "math"), fitness=Sphere(), start=start)


def test_fixed_search_scores_given_recipes(tmp_path):
    scored = []
    genome, problem = genome_problem(lambda x: scored.append(x.copy()) or Evaluation(float(np.sum(x)), {}))
    paths = []
    for i, value in enumerate((0.2, 0.7)):
        path = tmp_path / f"r{i}.yaml"
        path.write_text(genome.decode(np.full(8, value), 4, ("target", "ja")).to_yaml())
        paths.append(str(path))
    result = FixedSearch(recipes=paths).run(problem, tmp_path / "run")
    assert [r["fitness"] for r in read_trials(tmp_path / "run")] == pytest.approx([1.6, 5.6])
    assert result.best_trial == 1 and np.allclose(scored[1], 0.7)
    with pytest.raises(VlmergeError, match="search.recipes is empty"):
        FixedSearch(recipes=[])


def test_search_configs_instantiate(tmp_path):
    top = OmegaConf.create({"seed": 11, "resume": False, "search": OmegaConf.load(CONF / "cmaes.yaml")})
    search = instantiate(top.search)
    assert search == CMAESSearch(budget=100, sigma0=1 / 6, seed=11)
    top = OmegaConf.create({"resume": True, "search": OmegaConf.load(CONF / "fixed.yaml")})
    top.search.recipes = ["a.yaml"]
    assert instantiate(top.search) == FixedSearch(recipes=("a.yaml",), resume=True)
