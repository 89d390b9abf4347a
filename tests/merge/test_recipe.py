"""Recipe files: `sources` must be a list (a lone string is refused, never read one character at a time)."""

from __future__ import annotations

import pytest

from vlmerge.errors import VlmergeError
from vlmerge.merge.recipe import Recipe, Rule, load_recipe


def test_sources_list_is_read_in_order(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("op: linear\nsources: [target, ja]\n")
    assert load_recipe(path).sources == ("target", "ja")


@pytest.mark.parametrize("sources", ["target", "target, ja", "5"])
def test_sources_given_as_one_string_is_refused_with_the_list_syntax(tmp_path, sources):
    path = tmp_path / "r.yaml"
    path.write_text(f"op: linear\nsources: {sources}\n")
    raw = sources if sources != "5" else 5
    with pytest.raises(VlmergeError) as err:
        load_recipe(path)
    assert str(err.value) == (
        f"{path}.sources must be a list of strings, got {raw!r}; write it as sources: [target, DONOR, ...]"
    )


def test_sources_from_a_mapping_is_refused():
    with pytest.raises(VlmergeError, match=r"recipe.sources must be a list of strings, got \{'target': 1\}"):
        Recipe.from_dict({"op": "linear", "sources": {"target": 1}})


# ------------------------------------------------------------------ every field checked, naming file and key

BASE = "op: ties\nsources: [target, ja]\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seed: abc\n", "{path}.seed = 'abc': give an integer"),
        ("seed: 1.5\n", "{path}.seed = 1.5: give an integer"),
        ("seed: true\n", "{path}.seed = True: give an integer"),
        ("lambda: abc\n", "{path}.lambda = 'abc' is not a number"),
        ("lambda: true\n", "{path}.lambda = True is not a number"),
        ("normalize: 'yes'\n", "{path}.normalize = 'yes': give true, false or null"),
        ("rescale: 1\n", "{path}.rescale = 1: give true, false or null"),
        ("pool: models/vlm\n", "{path}.pool = 'models/vlm': give a mapping"),
        ("rules: {weight: 1.0}\n", "{path}.rules = {{'weight': 1.0}}: give a list of rules"),
        ("rules: weight\n", "{path}.rules = 'weight': give a list of rules"),
        ("rules: [{gamma: 1.5}]\n", "{path}.rules[0].gamma = 1.5 is outside [0, 1)"),
        ("rules: [{layers: true, weight: 1}]\n", "{path}.rules[0].layers = True: give a layer"),
        ("rules: [{layers: 2.5, weight: 1}]\n", "{path}.rules[0].layers = 2.5: give a layer"),
        ("rules: [{layers: [0, x], weight: 1}]\n", "{path}.rules[0].layers = [0, 'x']: give a layer"),
        ("rules: [{match: 5, weight: 1}]\n", "{path}.rules[0].match = 5: give a non-empty substring"),
        ("rules: [{match: '', weight: 1}]\n", "{path}.rules[0].match = '': give a non-empty substring"),
        ("rules: [{source: [ja], weight: 1}]\n", "{path}.rules[0].source = ['ja']: give one source name"),
        ("rules: [{weight: 1}, {source: jp, weight: 1}]\n",
         "{path}.rules[1].source = 'jp' is not one of the recipe's sources ['target', 'ja']"),
        ("rules: [{layers: [0, 3]}]\n", "{path}.rules[0] = {{'layers': [0, 3]}} sets no parameter"),
        ("rules: [{1: 2, weight: 1}]\n", "{path}.rules[0]: unknown key(s) ['1']"),
    ],
)  # fmt: skip
def test_bad_field_is_refused_naming_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(BASE + text)
    with pytest.raises(VlmergeError) as err:
        load_recipe(path)
    assert message.format(path=path) in str(err.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"op": ["ties"]}, "r.op: unknown merge op ['ties']; known ops: linear"),
        ({"sources": ["target", "ja", "target"]}, "r.sources = ['target', 'ja', 'target']: list the target first"),
        ({"sources": []}, "r.sources = []: list the target first"),
        ({"op": "slerp", "sources": ["target", "ja", "math"]}, "r.sources = ['target', 'ja', 'math']: op 'slerp' "
                                                              "merges exactly 2 sources"),
    ],
)  # fmt: skip
def test_bad_op_or_sources_is_refused_naming_where(raw, message):
    with pytest.raises(VlmergeError) as err:
        Recipe.from_dict({"op": "ties", "sources": ["target", "ja"], **raw}, where="r")
    assert message in str(err.value)


def test_numbers_yaml_reads_as_strings_are_numbers(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(BASE + "lambda: 1e-1\nrules: [{gamma: 1e-3, weight: 2e0}]\n")  # YAML 1.1: no dot -> a string
    recipe = load_recipe(path)
    assert recipe.lambda_ == 0.1 and dict(recipe.rules[0].values) == {"gamma": 0.001, "weight": 2.0}


# ------------------------------------------------------------------ rules that select no tensor

def tower(depth: int = 6) -> list[str]:
    """Tower names of a plain Mistral-like tower of `depth` layers."""
    per_layer = ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight",
                 "input_layernorm.weight")  # fmt: skip
    layers = [f"model.layers.{i}.{name}" for i in range(depth) for name in per_layer]
    return ["model.embed_tokens.weight", *layers, "model.norm.weight", "lm_head.weight"]


def recipe_with(*rules: dict, where: str = "r.yaml") -> Recipe:
    return Recipe.from_dict({"op": "ties", "sources": ["target", "ja"], "rules": list(rules)}, where=where)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"layers": [40], "weight": 0.5},
         "r.yaml.rules[1] {layers: [40, 40]}: layers [40, 40] select no tensor: the target tower has layers 0..5"),
        ({"source": "ja", "layers": [6, 9], "density": 0.5},  # a per-source rule is matched the same way
         "r.yaml.rules[1] {source: 'ja', layers: [6, 9]}: layers [6, 9] select no tensor: the target tower has "
         "layers 0..5"),
        ({"match": "vision_tower", "weight": 0.5},
         "r.yaml.rules[1] {match: 'vision_tower'}: match 'vision_tower' selects no tensor: no target-tower tensor "
         "name contains it (they look like model.layers.0.input_layernorm.weight"),
        ({"kind": "other", "weight": 0.5},
         "r.yaml.rules[1] {kind: 'other'}: kind 'other' selects no tensor: the target tower's tensors are of kinds "
         "['attention', 'embedding', 'mlp', 'norm']"),
    ],
)  # fmt: skip
def test_rule_that_selects_no_tensor_is_refused_naming_it_and_what_exists(rule, message):
    recipe = recipe_with({"weight": 1.0}, rule)
    with pytest.raises(VlmergeError) as err:
        recipe.check_selects(tower())
    assert message in str(err.value)


def test_every_rule_that_selects_nothing_is_in_the_one_message():
    recipe = recipe_with({"layers": [40], "weight": 1.0}, {"weight": 1.0}, {"match": "mpl", "kind": "mlp",
                                                                            "weight": 0.5})  # fmt: skip
    with pytest.raises(VlmergeError) as err:
        recipe.check_selects(tower())
    text = str(err.value)
    assert "r.yaml.rules[0] {layers: [40, 40]}" in text and "r.yaml.rules[2] {kind: 'mlp', match: 'mpl'}" in text
    assert "rules[1]" not in text


def test_rules_whose_selectors_each_select_something_are_accepted():
    recipe_with(
        {"weight": 1.0},
        {"layers": [4, 40], "weight": 0.5},  # part of the range exists
        {"layers": [0, 2], "kind": "embedding", "weight": 0.5},  # a genome kind cell: nothing here, the head elsewhere
        {"layers": [1, 3], "match": "lm_head", "density": 0.5},  # a mergekit gradient's per-layer rule of a filter
        {"source": "ja", "match": "model.layers.5.", "weight": 0.5},
    ).check_selects(tower())


def test_rules_built_in_code_are_named_by_index():
    recipe = Recipe(op="ties", sources=("target", "ja"), rules=(Rule(values={"weight": 1.0}, layers=(7, 7)),))
    with pytest.raises(VlmergeError, match=r"rules\[0\] \{layers: \[7, 7\]\}: layers \[7, 7\] select no tensor"):
        recipe.check_selects(tower())
