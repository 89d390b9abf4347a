"""Recipe rules that set a parameter the op ignores, and genome kinds whose cells select no tensor, are refused
naming the culprit; generated recipes (genome, mergekit import) are never refused for what they carry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.merge.test_recipe import tower
from vlmerge.errors import VlmergeError
from vlmerge.merge.command import read_recipe_file
from vlmerge.merge.genome import Genome
from vlmerge.merge.ops import OPS
from vlmerge.merge.recipe import Recipe, op_params


def written(op: str, *rules: dict, where: str = "r.yaml") -> Recipe:
    return Recipe.from_dict({"op": op, "sources": ["target", "ja"], "rules": list(rules)}, where=where)


# ------------------------------------------------------------------ parameters the op does not read


def test_each_op_reads_the_parameters_of_its_registry_entry():
    assert {op: op_params(op) for op in ("linear", "ties", "breadcrumbs", "slerp")} == {
        "linear": ("weight",), "ties": ("weight", "density"), "breadcrumbs": ("weight", "density", "gamma"),
        "slerp": ("t",)}  # fmt: skip


@pytest.mark.parametrize(
    ("op", "rules", "message"),
    [
        ("linear", [{"weight": 1.0, "density": 0.5}],
         "r.yaml.rules[0].density: op 'linear' does not read density (ops that do: ties, dare_ties, dare_linear, "
         "breadcrumbs, breadcrumbs_ties); op 'linear' reads only weight: remove it or choose an op that reads it"),
        ("ties", [{"weight": 1.0}, {"layers": [0, 2], "gamma": 0.1, "epsilon": 0.1}], "unknown key(s) ['epsilon']"),
        ("ties", [{"weight": 1.0}, {"layers": [0, 2], "gamma": 0.1}, {"t": 0.3}],
         "r.yaml.rules[1].gamma: op 'ties' does not read gamma (ops that do: breadcrumbs, breadcrumbs_ties); "
         "r.yaml.rules[2].t: op 'ties' does not read t (ops that do: slerp); op 'ties' reads only weight, density: "
         "remove them or choose an op that reads them"),
        ("slerp", [{"t": 0.3}, {"source": "ja", "weight": 2.0}],
         "r.yaml.rules[1].weight: op 'slerp' does not read weight"),
    ],
)  # fmt: skip
def test_a_parameter_the_op_ignores_is_refused_naming_rule_parameter_and_readers(tmp_path, monkeypatch, op, rules,
                                                                                 message):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    Path("r.yaml").write_text(yaml.safe_dump({"op": op, "sources": ["target", "ja"], "rules": rules}))
    with pytest.raises(VlmergeError) as err:  # what vlmerge-merge and vlmerge-eval recipe= read
        read_recipe_file("r.yaml")
    assert message in str(err.value)


def test_every_parameter_its_op_reads_is_accepted():
    for op in OPS:
        values = {p: 0.5 for p in op_params(op)}
        written(op, values, {"layers": [1, 2], **values}).check_read()


@pytest.mark.parametrize(
    "genome",
    [
        Genome(op="linear", params=["weight"], groups=2),
        Genome(op="ties", groups=3, kinds=["attention", "mlp"], outer="own", fixed={}),
        Genome(op="breadcrumbs_ties", params=["weight", "density", "gamma"], groups="layer"),
        Genome(op="dare_ties", params=["weight"], fixed={"density": 0.4}, frozen={"target": {"weight": 1.0}}),
        Genome(op="slerp", params=["t"], groups=2, kinds=["attention", "mlp"]),
    ],
)
def test_recipes_a_genome_writes_pass_the_check_after_a_round_trip(tmp_path, genome):
    recipe = genome.decode(np.full(genome.n_genes(6, ("target", "ja")), 0.3), 6, ("target", "ja"))
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    assert read_recipe_file(path)[0] == recipe


def test_mergekit_yaml_keeps_mergekit_meaning_ignored_parameters_are_dropped(tiny, tmp_path, caplog):
    """mergekit ignores a parameter its method does not read; the import warns and drops it, as before."""
    path = tmp_path / "mk.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(tiny.ja), "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": str(tiny.math), "parameters": {"weight": 1.0}}]}))  # fmt: skip
    recipe, _ = read_recipe_file(path)
    assert all(set(rule.values) == {"weight"} for rule in recipe.rules)
    assert "density is not read by linear" in caplog.text


# ------------------------------------------------------------------ genome kinds against the target tower


@pytest.mark.parametrize(
    ("genome", "message"),
    [
        (Genome(op="ties", kinds=["attention", "other"]),
         "merge.genome.kinds = ['attention', 'other']: the target tower has no tensor of kind 'other' (its "
         "tensors are of kinds ['attention', 'embedding', 'mlp', 'norm']): drop it"),
        (Genome(op="ties", kinds=["other", "mlp"]),  # the default kind too: its label would name no tensor
         "merge.genome.kinds = ['other', 'mlp']: the target tower has no tensor of kind 'other'"),
        (Genome(op="ties", groups=2, kinds=["attention", "embedding"]),
         "merge.genome.kinds = ['attention', 'embedding']: kind 'embedding' has a cell per layer group (2 layer "
         "groups) but no layer tensor of the target tower is of that kind (they are of kinds ['attention', 'mlp', "
         "'norm']), so its genes would change nothing: drop it, or give it its own genes with groups: model and "
         "outer: nearest"),
        (Genome(op="ties", outer="own", kinds=["mlp", "embedding"]), "(outer: own)"),
    ],
)  # fmt: skip
def test_genome_kind_whose_cells_select_no_tensor_is_refused_naming_it_and_the_towers_kinds(genome, message):
    with pytest.raises(VlmergeError) as err:
        genome.check_kinds(tower(6), 6)
    assert message in str(err.value)


def test_genome_kinds_that_select_tensors_are_accepted():
    for genome in (
        Genome(op="ties"),
        Genome(op="ties", groups=2, kinds=["attention", "mlp", "norm"]),
        Genome(op="ties", kinds=["attention", "embedding"]),  # groups: model: embedding and head get their genes
        Genome(op="ties", groups=[[0, 5]], kinds=["mlp", "embedding"]),  # one group is the whole tower too
        Genome(op="ties", groups=2, kinds=["embedding", "mlp"]),  # the default cell covers every other tensor
    ):
        genome.check_kinds(tower(6), 6)
