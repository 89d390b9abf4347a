"""End-of-run files: report.json + printed table, fitness.png, recipe.png."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.search.helpers import Sphere
from vlmerge.errors import VlmergeError
from vlmerge.merge.genome import Genome
from vlmerge.search.fitness import Problem
from vlmerge.search.loop import CMAESSearch
from vlmerge.search.plots import fitness_by_generation, plot_recipe, recipe_table
from vlmerge.search.report import format_table, write_report

PNG = b"\x89PNG\r\n\x1a\n"
ROWS = [
    {"name": "target", "split": "heldout", "rouge_l": 40.25, "n": 50},
    {"name": "evolved", "split": "heldout", "rouge_l": 47.123456, "n": 50, "failed": 0},
]


def test_report_json_table_and_plots(tmp_path, capsys):
    CMAESSearch(budget=20, popsize=4, seed=0).run(
        Problem(x0=np.full(3, 0.5), fitness=Sphere(fail_above=0.75)), tmp_path
    )
    genome = Genome(op="dare_ties", groups=2)
    recipe = genome.decode(np.linspace(0.1, 0.9, 8), 4, ("target", "ja"))
    path = write_report(tmp_path, ROWS, recipe=recipe, depth=4)
    report = json.loads(path.read_text())
    assert report["rows"] == ROWS
    search = report["search"]
    assert search["evaluations"] == 20 and search["generations"] == 5
    assert search["failed"] == sum(
        r["fitness"] is None for r in map(json.loads, open(tmp_path / "trials.jsonl"))
    )
    assert search["best_fitness"] == max(
        json.loads(line)["fitness"] or -1e9 for line in open(tmp_path / "trials.jsonl")
    )
    for name in ("fitness.png", "recipe.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["name", "split", "rouge_l", "n", "failed"]
    assert printed[3].split() == ["evolved", "heldout", "47.12", "50", "0"]
    assert printed[2].split() == ["target", "heldout", "40.25", "50", "-"]


def test_report_without_search_and_bad_rows(tmp_path):
    path = write_report(tmp_path, ROWS, echo=False)
    assert json.loads(path.read_text())["search"] is None and not (tmp_path / "fitness.png").exists()
    with pytest.raises(VlmergeError, match=r"report rows\[1\].*needs `name` and `split`"):
        write_report(tmp_path, [ROWS[0], {"name": "evolved", "rouge_l": 1.0}])


def test_fitness_by_generation_skips_failures():
    rows = [
        {"generation": 0, "fitness": 1.0},
        {"generation": 0, "fitness": None},
        {"generation": 0, "fitness": 3.0},
        {"generation": 1, "fitness": 2.0},
        {"generation": 1, "fitness": 2.5},
    ]
    gens, best, mean, so_far = fitness_by_generation(rows)
    assert (gens, best, mean, so_far) == ([0, 1], [3.0, 2.5], [2.0, 2.25], [3.0, 3.0])


def test_recipe_table_reads_values_per_layer_source_and_kind(tmp_path):
    genome = Genome(op="ties", groups=2, kinds=["attention", "mlp"], outer="own")
    x = np.linspace(0.05, 1.0, genome.n_genes(4, ("target", "ja")))
    recipe = genome.decode(x, 4, ("target", "ja"))
    table = recipe_table(recipe, 4)
    names = genome.gene_names(4, ("target", "ja"))
    value = lambda label, source, param: genome.value(param, x[names.index(f"{label}/{source}/{param}")])  # noqa: E731
    ja_weight = table["weight"]["ja"]
    assert ja_weight["attention"] == [value("pre", "ja", "weight")] + [
        value("layers 0-1/attention", "ja", "weight")
    ] * 2 + [value("layers 2-3/attention", "ja", "weight")] * 2 + [value("post", "ja", "weight")]
    assert ja_weight["mlp"][1:3] == [value("layers 0-1/mlp", "ja", "weight")] * 2
    assert ja_weight["norm"][1:-1] == ja_weight["attention"][1:-1]  # norms follow the first kind
    assert plot_recipe(recipe, 4, tmp_path / "r.png").read_bytes()[:8] == PNG


def test_format_table_pads_columns():
    text = format_table(
        [{"name": "a", "split": "s", "acc": 0.5}, {"name": "longer", "split": "s", "acc": None}]
    )
    assert text.splitlines()[2] == "a       s      0.5"
    assert text.splitlines()[3] == "longer  s        -"
