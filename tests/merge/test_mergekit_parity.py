"""mergekit YAML interop: `vlmerge-merge` and `mergekit-yaml` on the same YAML write the same tensors.

mergekit starts slowly (~5 s of imports), so every mergekit merge of this module runs in ONE subprocess that
calls the `mergekit-yaml` command (its click entry point, `--lazy-unpickle --quiet`) once per YAML, started
first and overlapped with the vlmerge merges (one through the `vlmerge-merge` console script, the others
through the same `merge_command` in process).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge_methods.base import ParameterScope, ParameterSpec
from mergekit.parameter_resolver import resolve_parameter
from safetensors.torch import load_file

from tests.fixtures.hf_models import make_base_lm, make_finetune
from vlmerge.errors import VlmergeError
from vlmerge.merge.command import export_recipe, merge_command, read_recipe_file
from vlmerge.merge.mergekit_export import to_mergekit, to_mergekit_yaml
from vlmerge.merge.mergekit_yaml import from_mergekit, layer_t, value_at
from vlmerge.merge.merger import check_sources
from vlmerge.merge.recipe import Recipe
from vlmerge.models.pool import Pool
from vlmerge.models.towers import layer_of, module_kind

DEPTH = 5
MERGEKIT_BATCH = """
import json, sys
from mergekit.scripts.run_yaml import main
for config, out in json.loads(sys.argv[1]):
    main([config, out, "--lazy-unpickle", "--quiet", "--random-seed", "0"], standalone_mode=False)
"""


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    """Three fp32 fine-tunes of one 5-layer Mistral base."""
    root = tmp_path_factory.mktemp("lms")
    base = make_base_lm(root / "base", layers=DEPTH, seed=11)
    return {"base": base, **{f"ft{i}": make_finetune(base, root / f"ft{i}", seed=20 + i) for i in (1, 2, 3)}}


def entry(path, **parameters) -> dict:
    return {"model": str(path), **({"parameters": parameters} if parameters else {})}


def cases(m: dict, tiny) -> dict[str, tuple[dict, dict]]:
    """name -> (YAML for vlmerge, YAML for mergekit): the same, except that VLM cases give mergekit the plain
    LM that is the VLM's language tower (mergekit cannot merge inside a VLM)."""
    base = str(m["base"])
    ft1, ft2, ft3 = m["ft1"], m["ft2"], m["ft3"]
    same = {
        "linear": {"merge_method": "linear", "dtype": "float32",
                   "models": [entry(ft1, weight=0.5), entry(ft2, weight=[0.2, 0.8]), entry(ft3, weight=0.3)]},
        "task_arithmetic": {
            "merge_method": "task_arithmetic", "base_model": base, "parameters": {"lambda": 0.9},
            "models": [entry(ft1, weight=0.6), entry(ft2, weight=0.3), entry(ft3, weight=-0.2)]},
        "ties": {"merge_method": "ties", "base_model": base, "dtype": "float32", "models": [
            entry(base, weight=5.0),  # the base is never merged: changes nothing
            entry(ft1, weight=0.7, density=0.4), entry(ft2, weight=0.5, density=0.6),
            entry(ft3, weight=0.4, density=0.9)]},
        "slerp": {"merge_method": "slerp", "base_model": str(ft1), "models": [entry(ft1), entry(ft2)],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                       {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": base, "models": [
            entry(ft1, weight=0.6, density=0.8, gamma=0.05), entry(ft2, weight=0.4, density=0.7),
            entry(ft3, weight=0.5)]},
        "lists_and_filters": {
            "merge_method": "breadcrumbs_ties", "base_model": base,
            "parameters": {"weight": 0.3, "density": [0.9, 0.5], "normalize": True, "rescale": True,
                           "lambda": 1.1, "int8_mask": True},
            "models": [
                entry(ft1, weight=[{"filter": "self_attn", "value": [0.1, 0.9, 0.4]},
                                   {"filter": "mlp.down_proj", "value": 0.7},
                                   {"filter": "*", "value": [0.2, 0.6]}]),
                entry(ft2, density=[{"filter": "mlp", "value": 0.6}]),  # elsewhere: the top-level gradient
                entry(ft3, weight=[{"filter": "lm_head", "value": 0.9},
                                   {"filter": "norm", "value": "1e-1"}])]},  # elsewhere: the top-level 0.3
    }  # fmt: skip
    out = {name: (raw, raw) for name, raw in same.items()}
    t = {"t": [{"filter": "mlp", "value": [0.2, 0.9]}, {"value": 0.35}]}
    vlm_slerp = {"merge_method": "slerp", "base_model": str(tiny.ja), "parameters": t,
                 "models": [entry(tiny.ja), entry(tiny.llava)]}  # fmt: skip
    vlm_ties = {"merge_method": "ties", "base_model": str(tiny.llava), "models": [
        entry(tiny.ja, weight=0.8, density=0.5), entry(tiny.base, weight=0.5, density=0.7)]}  # fmt: skip
    as_lm = (json.dumps(str(tiny.llava)), json.dumps(str(tiny.vlm_lm)))
    for name, raw in (("vlm_slerp", vlm_slerp), ("vlm_ties", vlm_ties)):
        out[name] = (raw, json.loads(json.dumps(raw).replace(*as_lm)))
    return out


def searched_recipe() -> tuple[Recipe, list]:
    """A recipe as the search decodes it: per-layer weights and densities per source, kind and match rules."""
    rules = [{"weight": 0.4, "density": 0.8}]
    for source, weights in (("target", (0.2, 0.5, 0.5, 0.9, 0.3)), ("ft2", (0.7, 0.1, 0.6, 0.6, 0.2)),
                            ("ft3", (0.3, 0.3, 0.8, 0.1, 0.5))):  # fmt: skip
        rules += [{"source": source, "layers": [i, i], "weight": w} for i, w in enumerate(weights)]
    rules += [{"source": "ft2", "layers": [1, 3], "density": 0.5}, {"kind": "attention", "density": 0.6},
              {"source": "ft3", "match": "mlp.up_proj", "weight": 1.2},
              {"source": "target", "kind": "embedding", "weight": 0.05}]  # fmt: skip
    raw = {"op": "ties", "sources": ["target", "ft2", "ft3"], "rules": rules, "lambda": 0.95}
    return Recipe.from_dict(raw), rules


def load_dir(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def vlmerge_in_process(recipe_file: Path, out: Path) -> None:
    from hydra import compose, initialize_config_dir

    from vlmerge.cli import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("merge_cli", overrides=[f"recipe={recipe_file}", f"output_dir={out}"])
    merge_command(cfg)


@pytest.fixture(scope="module")
def merged(lms, tiny, tmp_path_factory):
    """name -> (vlmerge output, mergekit output, rows compared (None: all)): every case merged both ways."""
    root = tmp_path_factory.mktemp("parity")
    jobs, results, ours = [], {}, {}
    for name, (for_vlmerge, for_mergekit) in cases(lms, tiny).items():
        ours[name] = root / f"{name}.vlmerge.yaml"
        ours[name].write_text(yaml.safe_dump(for_vlmerge))
        theirs = root / f"{name}.yaml"
        theirs.write_text(yaml.safe_dump(for_mergekit))
        jobs.append((str(theirs), str(root / name / "mergekit")))
        results[name] = (root / name / "vlmerge", root / name / "mergekit")
    recipe, _ = searched_recipe()
    pool_cfg = {"target": str(lms["ft1"]), "donors": {"ft2": str(lms["ft2"]), "ft3": str(lms["ft3"])},
                "base": str(lms["base"])}  # fmt: skip
    (root / "searched.yaml").write_text(to_mergekit_yaml(recipe, pool_cfg, DEPTH))
    jobs.append((str(root / "searched.yaml"), str(root / "searched" / "mergekit")))
    results["searched"] = (root / "searched" / "vlmerge", root / "searched" / "mergekit")

    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    mergekit = subprocess.Popen([sys.executable, "-c", MERGEKIT_BATCH, json.dumps(jobs)], **pipes)
    console_script = str(Path(sys.executable).parent / "vlmerge-merge")
    cli = subprocess.Popen([console_script, f"recipe={ours['lists_and_filters']}",
                            f"output_dir={results['lists_and_filters'][0]}"], **pipes)  # fmt: skip
    try:
        for name, recipe_file in ours.items():
            if name != "lists_and_filters":
                vlmerge_in_process(recipe_file, results[name][0])
        export_recipe(Pool(**pool_cfg, verbose=False), recipe, results["searched"][0])
        cli_log = cli.communicate(timeout=120)[0]
        mergekit_log = mergekit.communicate(timeout=180)[0]
    finally:
        for proc in (mergekit, cli):
            if proc.poll() is None:
                proc.kill()
    assert cli.returncode == 0, cli_log
    assert mergekit.returncode == 0, mergekit_log
    return results


PARITY = ["linear", "task_arithmetic", "ties", "slerp", "breadcrumbs", "lists_and_filters", "vlm_slerp",
          "vlm_ties", "searched"]  # fmt: skip


@pytest.mark.parametrize("name", PARITY)
def test_same_tensors_as_mergekit(merged, name):
    ours, theirs = (load_dir(folder) for folder in merged[name])
    if name.startswith("vlm_"):  # the VLM's tower on disk; its extra <image> row is the VLM's own
        prefix = "language_model."
        ours = {k.removeprefix(prefix): v for k, v in ours.items() if k.startswith(prefix)}
    assert sorted(ours) == sorted(theirs)
    for key, expected in theirs.items():
        got = ours[key][: expected.shape[0]]
        assert got.dtype == expected.dtype == torch.float32, key
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=lambda m, k=key: f"{name} {k}: {m}")


def test_merged_models_differ_from_their_inputs(merged, lms):
    """Guards the parity test against a trivial pass (e.g. both sides copying one input)."""
    ours = load_dir(merged["lists_and_filters"][0])
    for model in lms.values():
        source = load_dir(model)
        assert any(not torch.allclose(ours[k], source[k]) for k in source)


def mergekit_value(config: MergeConfiguration, model: str, param: str, name: str, depth: int) -> float:
    """mergekit's own resolver: the model's parameters, then the top-level ones, then the default."""
    layer = layer_of(name)
    t = 0.0 if layer is None else layer_t(layer, depth)
    spec = ParameterSpec(param, float, ParameterScope.INPUT if param != "t" else ParameterScope.SHARED,
                         default={"density": 1.0, "gamma": 0.01}.get(param, 1.0))  # fmt: skip
    own = [m.parameters for m in config.models if str(m.model) == model] if param != "t" else []
    return resolve_parameter(spec, [*own, config.parameters], tensor_name=name, t=t)


def tower_names(folder: Path) -> list[str]:
    return list(load_file(folder / "model.safetensors"))


@pytest.mark.parametrize("name", ["linear", "slerp", "lists_and_filters"])
def test_every_parameter_resolves_as_in_mergekit(lms, tiny, name, tmp_path):
    raw = cases(lms, tiny)[name][0]
    recipe, pool = from_mergekit(raw, where=name)
    config = MergeConfiguration.model_validate(raw)
    paths = {"target": pool["target"], **pool["donors"]}
    for tensor in tower_names(lms["base"]):
        args = recipe.args_for(tensor, layer_of(tensor), module_kind(tensor))
        if recipe.op == "slerp":
            assert args.t == mergekit_value(config, "", "t", tensor, DEPTH), tensor
            continue
        for i, source in enumerate(recipe.sources):
            for param in ("weight", "density"):
                expected = mergekit_value(config, paths[source], param, tensor, DEPTH)
                assert getattr(args, param)[i] == expected, (source, param, tensor)


def test_recipe_file_is_recognised_and_pools_follow_mergekit_roles(lms, tiny, tmp_path):
    raws = cases(lms, tiny)
    path = tmp_path / "ties.yaml"
    path.write_text(yaml.safe_dump(raws["ties"][0]))
    recipe, pool = read_recipe_file(path)
    assert recipe.sources == ("target", "ft2", "ft3")  # base listed but not merged
    assert recipe.lambda_ == 1.0 and recipe.normalize is None
    assert from_mergekit({**raws["ties"][0], "parameters": {"lambda": 0}}, "l")[0].lambda_ == 0.0
    assert pool == {"target": str(lms["ft1"]), "donors": {"ft2": str(lms["ft2"]), "ft3": str(lms["ft3"])},
                    "base": str(lms["base"])}  # fmt: skip
    with_base = {**raws["linear"][0], "base_model": str(lms["base"])}  # linear merges an unlisted base too
    with pytest.raises(VlmergeError, match=f"model {lms['base']} has no `weight`"):
        from_mergekit(with_base, "linear")
    linear = from_mergekit({**with_base, "parameters": {"weight": 0.1}}, "linear")[1]
    assert linear["donors"] == {"ft2": str(lms["ft2"]), "ft3": str(lms["ft3"]), "base_2": str(lms["base"])}
    slerp, slerp_pool = from_mergekit(raws["vlm_slerp"][0], "vlm_slerp")
    assert slerp_pool == {"target": str(tiny.llava), "donors": {"ja": str(tiny.ja)}}
    mlp = slerp.args_for("model.layers.3.mlp.up_proj.weight", 3, "mlp").t
    assert mlp == pytest.approx(1 - 0.9) and slerp.args_for("model.norm.weight", None, "norm").t == 0.65
    ties, ties_pool = from_mergekit(raws["vlm_ties"][0], "vlm_ties")
    assert ties_pool == {"target": str(tiny.llava), "donors": {"ja": str(tiny.ja), "base_2": str(tiny.base)}}
    assert ties.args_for("model.norm.weight", None, "norm").weight[0] == 0.0


@pytest.mark.parametrize("depth", [1, 5, 23, 32, 40, 80])
def test_one_value_per_layer_hits_each_layer(depth):
    values = tuple(float(i * 7 % 11) / 10 for i in range(depth))
    for i in range(depth):
        # t (n - 1) may round below i: then mergekit mixes in a 1e-16 share of the previous value
        assert value_at(values, layer_t(i, depth)) == pytest.approx(values[i], abs=1e-14)


@pytest.mark.parametrize("op", ["linear", "task_arithmetic", "slerp", "breadcrumbs", "ties"])
def test_to_mergekit_round_trips_through_from_mergekit(lms, op):
    recipe, rules = searched_recipe()
    sources = ("target", "ft2") if op == "slerp" else recipe.sources
    if op == "slerp":
        rules = [{"t": 0.3}, {"layers": [2, 3], "t": 0.8}, {"kind": "attention", "layers": [0, 0], "t": 0.1}]
    else:
        rules = [r for r in rules if r.get("source", "target") in sources] + [{"gamma": 0.02}]
    recipe = Recipe.from_dict({"op": op, "sources": list(sources), "rules": rules, "normalize": op != "ties"})
    pool = {
        "target": str(lms["ft1"]),
        "donors": {s: str(lms[s]) for s in sources[1:]},
        "base": str(lms["base"]),
    }
    raw = to_mergekit(recipe, pool, DEPTH)
    back, back_pool = from_mergekit(yaml.safe_load(to_mergekit_yaml(recipe, pool, DEPTH)), "round trip")
    assert back_pool["target"] == pool["target"] and back.sources == recipe.sources
    for tensor in tower_names(lms["base"]):
        where = (tensor, layer_of(tensor), module_kind(tensor))
        a, b = recipe.args_for(*where), back.args_for(*where)
        assert b.weight == pytest.approx(a.weight, rel=1e-12) or op == "slerp", tensor
        assert b.density == pytest.approx(a.density, rel=1e-12) or op in (
            "slerp",
            "linear",
            "task_arithmetic",
        )
        assert b.t == pytest.approx(a.t, rel=1e-12) or op != "slerp"
    if op != "slerp":  # per-layer weights without a kind rule are one list, not one filter per tensor
        weight = raw["models"][1]["parameters"]["weight"]
        assert weight[-1] == {"value": [0.7, 0.1, 0.6, 0.6, 0.2]}  # the catch-all
        assert {c.get("filter") for c in weight[:-1]} == {"embed_tokens", "lm_head", "model.norm.weight"}


def test_to_mergekit_refuses_what_mergekit_cannot_express(lms, tiny):
    recipe, _ = searched_recipe()
    pool = {"target": str(lms["ft1"]), "donors": {"ft2": str(lms["ft2"]), "ft3": str(lms["ft3"])}}
    with pytest.raises(VlmergeError, match="is a VLM"):
        to_mergekit(Recipe.from_dict({"op": "linear", "sources": ["target", "ja"]}),
                    {"target": str(tiny.llava), "donors": {"ja": str(tiny.ja)}}, 4)  # fmt: skip
    with pytest.raises(VlmergeError, match="layer_map"):
        to_mergekit(recipe, {**pool, "layer_map": {"ft2": [0, 1, 2, 3, 4]}}, DEPTH)
    sources = list(recipe.sources)
    normalized = Recipe.from_dict({"op": "task_arithmetic", "sources": sources, "normalize": True})
    with pytest.raises(VlmergeError, match="set its weight to 0"):
        to_mergekit(normalized, pool, DEPTH)
    assert to_mergekit(recipe, pool, DEPTH)["base_model"] == str(lms["ft1"])  # TIES: the target's delta is 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"merge_method": "della"}, "merge_method 'della' is not supported; supported: breadcrumbs, "),
        ({"tokenizer_source": "union"}, "tokenizer_source = 'union' is not supported"),
        ({"slices": [{"sources": []}]}, "`slices` is not supported"),
        ({"base_model": None}, "merge_method ties needs `base_model`"),
        ({"parameters": {"wieght": 1}}, r"unknown parameter\(s\) \['wieght'\]"),
        ({"parameters": {"normalize": [True, False]}}, "give true or false"),
        ({"parameters": {"lambda": [0.5, 1.0]}}, "one lambda for all tensors"),
        ({"models": [entry("FT1"), entry("FT2", weight=1)]}, "has no `weight`"),
        ({"models": [entry("FT1+lora", weight=1)]}, "LoRA"),
        ({"models": [entry("FT1", weight=[{"filter": "mlp"}])]}, r"weight\[0\]: want `value`"),
        ({"models": [entry("FT1", weight="heavy")]}, "'heavy' is not a number"),
    ],
)  # fmt: skip
def test_bad_mergekit_yaml_is_refused_with_one_message(lms, tiny, change, message):
    raw = cases(lms, tiny)["ties"][0]
    change = json.loads(json.dumps(change).replace("FT1", str(lms["ft1"])).replace("FT2", str(lms["ft2"])))
    with pytest.raises(VlmergeError, match=message):
        from_mergekit({**raw, **change}, "x.yaml")


@pytest.mark.parametrize(
    "models, parameters, message",
    [
        ([entry("FT1", weight=1, density=[0.5, 0.5, 1.5, 0.5, 0.5])], None,
         "x.yaml.models[0].parameters.density[2] = 1.5 is outside (0, 1] (read by layer 2)"),
        ([entry("FT1", weight=1, density=[0.5, 0])], None,
         "x.yaml.models[0].parameters.density[1] = 0.0 is outside (0, 1] (read by layers 1-4)"),
        ([entry("FT1", weight=1), entry("FT2", weight=1, density=[0.5, "dense"])], None,
         "x.yaml.models[1].parameters.density[1] = 'dense' is not a number"),
        ([entry("FT1", weight=1, density=[{"filter": "mlp", "value": [0.5, -1]}, {"value": 0.5}])], None,
         "x.yaml.models[0].parameters.density[0].value[1] = -1.0 is outside (0, 1] (read by layers 1-4)"),
        ([entry("FT1", weight=1), entry("FT2", weight=1)], {"density": [1.2, 0.5, 0.5]},
         "x.yaml.parameters.density[0] = 1.2 is outside (0, 1] (read by layers 0-1 and the non-layer tensors)"),
        ([entry("FT1", weight=1, density=0.5, gamma=1.5)], None,
         "x.yaml.models[0].parameters.gamma = 1.5 is outside [0, 1)"),
        ([entry("FT1", weight=float("nan"))], None, "x.yaml.models[0].parameters.weight = nan is not finite"),
    ],
)  # fmt: skip
def test_bad_value_lists_name_the_file_key_and_layers(lms, tiny, models, parameters, message):
    raw = {"merge_method": "breadcrumbs", "base_model": str(lms["base"]),
           "models": json.loads(json.dumps(models).replace("FT1", str(lms["ft1"])).replace("FT2", str(lms["ft2"]))),
           **({"parameters": parameters} if parameters else {})}  # fmt: skip
    with pytest.raises(VlmergeError) as err:
        from_mergekit(raw, "x.yaml")
    assert message in str(err.value)


def test_gradient_longer_than_the_tower_is_resampled_as_mergekit_does(lms):
    values = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]  # written for a deeper model
    raw = {"merge_method": "breadcrumbs", "base_model": str(lms["base"]),
           "models": [entry(str(lms["ft1"]), weight=1, density=values)]}  # fmt: skip
    recipe, _ = from_mergekit(raw, "x.yaml")
    for layer in range(DEPTH):
        density = recipe.args_for(f"model.layers.{layer}.mlp.up_proj.weight", layer, "mlp").density
        assert density[0] == pytest.approx(value_at(tuple(values), layer_t(layer, DEPTH)))


def test_filter_that_matches_no_tensor_is_refused_once_naming_the_entry(lms, tiny):
    raw = {"merge_method": "ties", "base_model": str(lms["base"]), "models": [
        entry(lms["ft1"], weight=[{"filter": "self_atn", "value": [0.2, 0.8]}, {"value": 0.5}], density=0.5),
        entry(lms["ft2"], weight=0.5, density=0.5)]}  # fmt: skip
    recipe, pool = from_mergekit(raw, "x.yaml")
    with pytest.raises(VlmergeError) as err:
        check_sources(Pool(**pool, verbose=False), recipe)
    text = str(err.value)
    assert ("x.yaml.models[0].parameters.weight[0] {source: 'target', match: 'self_atn'}: match 'self_atn' selects "
            "no tensor: no target-tower tensor name contains it") in text
    assert text.count("selects no tensor") == 1  # once, though the gradient made a rule per layer


def test_slerp_needs_exactly_two_inputs_and_t(lms, tiny):
    raw = cases(lms, tiny)["slerp"][0]
    with pytest.raises(VlmergeError, match="one other model"):
        from_mergekit({**raw, "models": [*raw["models"], {"model": str(lms["ft3"])}]}, "s.yaml")
    with pytest.raises(VlmergeError, match="needs `t`"):
        from_mergekit({**raw, "parameters": {}}, "s.yaml")
