"""`vlmerge` refuses, before the model loads, search=fixed recipe files and baselines that do not fit the pool
(rules that select no tensor of the target tower, other sources, parameters the op ignores), search=fixed recipe
files the genome cannot express (another op), genome kinds the target tower lacks and task data that is not there,
each in one message naming the culprit (file, config key); a fitting fixed recipe still runs to the table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tests.test_run import write_math
from vlmerge.cli import config_dir
from vlmerge.errors import VlmergeError
from vlmerge.run import run


def math_config(tiny, tmp_path, *overrides: str):
    data = tmp_path / "math" if (tmp_path / "math").is_dir() else write_math(tmp_path / "math")
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("config", overrides=[
            "experiment=toy_math_ja", f"pool.target.path={tiny.ja}", f"pool.donors.math.path={tiny.math}",
            f"pool.base.path={tiny.base}", f"task.data={data}", "task.max_new_tokens=2", "task.stop=[]",
            "merge.genome.groups=2", f"+run_dir={tmp_path / 'run'}", *overrides])  # fmt: skip


def recipe_file(cfg, path, **changes) -> str:
    """A recipe the run's genome can express (the pool's sources), with top-level keys or rules replaced."""
    genome = instantiate(cfg.merge.genome, _convert_="all")
    raw = genome.decode(np.full(genome.n_genes(4, ("target", "math")), 0.3), 4, ("target", "math")).to_dict()
    path.write_text(yaml.safe_dump({**raw, **changes}))
    return str(path)


@pytest.fixture
def no_model(monkeypatch):
    """The refusals must come before the model loads (and so before the search writes anything)."""

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr("vlmerge.candidates.load_model", loaded)


def refusal(cfg) -> str:
    with pytest.raises(VlmergeError) as err:
        run(cfg)
    return str(err.value)


def test_a_fixed_recipe_rule_that_selects_no_tensor_is_refused_naming_the_file(tiny, tmp_path, no_model):
    cfg = math_config(tiny, tmp_path)
    rules = [{"weight": 1.0, "density": 0.5}, {"layers": [40], "weight": 0.5}]
    path = recipe_file(cfg, tmp_path / "r.yaml", rules=rules)
    message = refusal(math_config(tiny, tmp_path, "search=fixed", f"search.recipes=[{path}]"))
    assert message == (f"recipe rule(s) that would change nothing: {path}.rules[1] {{layers: [40, 40]}}: layers "
                       "[40, 40] select no tensor: the target tower has layers 0..3")  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_a_fixed_recipe_of_other_sources_is_refused_naming_the_file(tiny, tmp_path, no_model):
    cfg = math_config(tiny, tmp_path)
    path = recipe_file(cfg, tmp_path / "r.yaml", sources=["target", "ja"], rules=[{"weight": 1.0}])
    message = refusal(math_config(tiny, tmp_path, "search=fixed", f"search.recipes=[{path}]"))
    assert message == (f"recipe {path} sources ['target', 'ja'] do not match the pool's sources ['target', "
                       "'math'] (the target first, then the donors in pool order)")  # fmt: skip


def test_a_fixed_recipe_parameter_the_op_ignores_is_refused_naming_the_file(tiny, tmp_path, no_model):
    cfg = math_config(tiny, tmp_path)
    path = recipe_file(cfg, tmp_path / "r.yaml", rules=[{"weight": 1.0, "density": 0.5, "gamma": 0.1}])
    message = refusal(math_config(tiny, tmp_path, "search=fixed", f"search.recipes=[{path}]"))
    assert message.startswith(f"{path}.rules[0].gamma: op 'dare_ties' does not read gamma (ops that do: "
                              "breadcrumbs, breadcrumbs_ties)")  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"op": "linear", "rules": [{"weight": 1.0}]}, "cannot encode a 'linear' recipe with a 'dare_ties' genome"),
        ({"rules": [{"weight": 1.0, "density": 0.5}, {"layers": [0, 0], "weight": 0.5}]},
         "cannot encode: weight of target differs within genome cell 'layers 0-1' (model.layers.0.self_attn.q_proj."
         "weight: 0.5, model.layers.1.self_attn.q_proj.weight: 1.0)"),
    ],
)  # fmt: skip
def test_a_fixed_recipe_the_genome_cannot_express_is_refused_naming_the_file(tiny, tmp_path, no_model, changes,
                                                                              message):  # fmt: skip
    """Genome.encode's refusals (another op, values that differ within one genome cell), before the model loads."""
    path = recipe_file(math_config(tiny, tmp_path), tmp_path / "r.yaml", **changes)
    cfg = math_config(tiny, tmp_path, "search=fixed", f"search.recipes=[{path}]")
    assert refusal(cfg) == f"recipe {path}: {message}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+baselines.late={op: ties, rules: [{weight: 1.0}, {layers: [4, 9], density: 0.5}]}",
         "recipe rule(s) that would change nothing: baselines.late.rules[1] {layers: [4, 9]}: layers [4, 9] select "
         "no tensor: the target tower has layers 0..3"),
        ("baselines.linear.rules=[{weight: 1.0, density: 0.5}]",
         "baselines.linear.rules[0].density: op 'linear' does not read density"),
    ],
)  # fmt: skip
def test_a_baseline_that_does_not_fit_is_refused_naming_it(tiny, tmp_path, no_model, override, message):
    """Baselines are written in config like any recipe (rules with layers, kinds, matches), so they can miss."""
    assert message in refusal(math_config(tiny, tmp_path, override))


def test_a_genome_kind_the_tower_lacks_is_refused(tiny, tmp_path, no_model):
    message = refusal(math_config(tiny, tmp_path, "merge.genome.kinds=[attention,other]"))
    assert message == ("merge.genome.kinds = ['attention', 'other']: the target tower has no tensor of kind "
                       "'other' (its tensors are of kinds ['attention', 'embedding', 'mlp', 'norm']): drop it")


def test_a_fitting_fixed_recipe_is_scored_and_the_baselines_reach_the_table(tiny, tmp_path):
    cfg = math_config(tiny, tmp_path)
    path = recipe_file(cfg, tmp_path / "r.yaml")
    run(math_config(tiny, tmp_path, "search=fixed", f"search.recipes=[{path}]"))
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["target", "math", "linear", "ties", "dare_ties", "evolved"]
    assert report["search"]["evaluations"] == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task.data=/nope/math"],
         "task.data: dataset not found: /nope/math (a .jsonl file or a folder of <split>.jsonl files)"),
        (["+task@heldout_task=mgsm_ja", "heldout_task.data=/nope/mgsm_ja.tsv"],
         "heldout_task.data: MGSM file not found: /nope/mgsm_ja.tsv (a question<TAB>answer .tsv file)"),
        (["+task@heldout_task=mgsm_ja", "heldout_task.data="],
         "heldout_task: task 'mgsm_ja': no data given; set heldout_task.data=<hub id or local path>"),
    ],
)  # fmt: skip
def test_task_data_that_is_not_there_is_refused_naming_the_key_and_the_path(tiny, tmp_path, no_model, overrides,
                                                                            message):  # fmt: skip
    assert refusal(math_config(tiny, tmp_path, *overrides)) == message
