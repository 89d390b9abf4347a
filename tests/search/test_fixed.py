"""search=fixed: `search.recipes=PATH` on the command line is one recipe file, not one per character."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from vlmerge.errors import VlmergeError
from vlmerge.merge.genome import Genome
from vlmerge.search.checkpoint import read_trials
from vlmerge.search.fitness import Evaluation, Problem
from vlmerge.search.fixed import FixedSearch

CONF = Path(__file__).resolve().parents[2] / "conf"


def search_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["search=fixed", *overrides]).search


def test_one_recipe_path_on_the_command_line_is_scored(tmp_path):
    genome = Genome(op="ties", groups=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(genome.decode(np.full(8, 0.3), 4, ("target", "ja")).to_yaml())
    search = instantiate(search_config(f"search.recipes={recipe}"), _convert_="all")  # as vlmerge.run does
    assert search.recipes == (str(recipe),)
    problem = Problem.for_genome(genome, 4, ("target", "ja"), fitness=lambda x: Evaluation(float(np.sum(x)), {}))
    result = search.run(problem, tmp_path / "run")
    assert [row["fitness"] for row in read_trials(tmp_path / "run")] == pytest.approx([2.4])
    assert result.evaluations == 1
    assert FixedSearch(recipes=recipe).recipes == (str(recipe),)  # a Path is one file too


def test_recipes_that_are_not_paths_are_named():
    recipes = search_config("search.recipes=5").recipes
    with pytest.raises(VlmergeError, match=r"search.recipes must be a list of strings, got 5; write it as search.rec"):
        FixedSearch(recipes=recipes)
    with pytest.raises(VlmergeError, match=r"search.recipes must be a list of strings, got \['a.yaml', 5\]"):
        FixedSearch(recipes=["a.yaml", 5])
