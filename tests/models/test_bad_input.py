"""Each bad input of a merge: one message naming the culprit, a non-zero exit, nothing left behind."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from tests.fixtures.hf_models import make_base_lm, make_finetune
from tests.fixtures.tokenizer import build_tokenizer
from vlmerge.errors import VlmergeError
from vlmerge.merge.command import export_recipe
from vlmerge.merge.recipe import Recipe
from vlmerge.models.pool import Pool


def write_recipe(path, tiny, **overrides):
    raw = {"op": "ties", "sources": ["target", "ja"], "rules": [{"weight": 0.5, "density": 0.5}],
           "pool": {"target": str(tiny.llava), "donors": {"ja": str(tiny.ja)}, "base": str(tiny.base)}}  # fmt: skip
    raw.update(overrides)
    path.write_text(yaml.safe_dump(raw))
    return path


def merge_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from vlmerge.cli import merge_main; merge_main()", *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_cli_merges_and_refuses_existing_output(tiny, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny)
    out = tmp_path / "out"
    done = merge_cli(f"recipe={recipe}", f"output_dir={out}")
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors.index.json").is_file()
    again = merge_cli(f"recipe={recipe}", f"output_dir={out}")
    assert again.returncode == 2
    assert f"output dir {out} exists and is not empty; pass overwrite=true" in again.stderr
    assert "Traceback" not in again.stderr
    assert merge_cli(f"recipe={recipe}", f"output_dir={out}", "overwrite=true").returncode == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"op": "tiez"}, "unknown merge op 'tiez'; known ops: linear"),
        ({"rules": [{"kind": "mlps", "weight": 1}]}, "kind = 'mlps': unknown module kind"),
        ({"rules": [{"layer": 3, "weight": 1}]}, "unknown key(s) ['layer']"),
        ({"rules": [{"density": 1.5}]}, "density = 1.5 is outside (0, 1]"),
        ({"rules": [{"weight": float("nan")}]}, "weight = nan is not finite"),
        ({"rules": [{"weight": float("inf")}]}, "weight = inf is not finite"),
        ({"pool": {"target": "/nonexistent/vlm", "donors": {}}}, "model dir not found: /nonexistent/vlm"),
        ({"seed": "abc"}, "r.yaml.seed = 'abc': give an integer"),
        ({"rules": [{"weight": 1}, {"source": "ja", "layers": [40], "weight": 2}]},
         "r.yaml.rules[1] {source: 'ja', layers: [40, 40]}: layers [40, 40] select no tensor: the target tower has "
         "layers 0..3"),
        ({"rules": [{"match": "vision_tower", "weight": 2}]},
         "r.yaml.rules[0] {match: 'vision_tower'}: match 'vision_tower' selects no tensor"),
    ],
)  # fmt: skip
def test_cli_bad_recipe(tiny, tmp_path, overrides, message):
    recipe = write_recipe(tmp_path / "r.yaml", tiny, **overrides)
    done = merge_cli(f"recipe={recipe}", f"output_dir={tmp_path / 'out'}")
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stderr.count("error:") == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_cli_unknown_config_key(tiny, tmp_path):
    done = merge_cli(f"recipe={write_recipe(tmp_path / 'r.yaml', tiny)}", f"output_dir={tmp_path}/o", "overwirte=true")
    assert done.returncode != 0
    assert "overwirte" in done.stderr


def test_truncated_and_corrupt_safetensors(tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny.ja, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(VlmergeError, match=r"corrupt or truncated safetensors file .*broken/model.safetensors"):
        Pool(target=str(tiny.llava), donors={"ja": str(broken)}, base=str(tiny.base))
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(VlmergeError, match="corrupt or truncated"):
        Pool(target=str(tiny.llava), donors={"ja": str(broken)}, base=str(tiny.base))


def test_shape_mismatch_names_both_shapes(tiny, tmp_path):
    wide = make_base_lm(tmp_path / "wide")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(wide)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(torch.zeros(65, 32))
    model.config.intermediate_size = 64
    model.save_pretrained(wide)
    with pytest.raises(VlmergeError) as err:
        Pool(target=str(tiny.llava), donors={"ja": str(wide)}, base=str(tiny.base))
    assert "model.layers.0.mlp.up_proj.weight: target [64, 32] vs ja [65, 32]" in str(err.value)


def test_unmappable_towers_list_what_is_unmapped_and_layer_map_fixes_it(tiny, tmp_path):
    deep = make_finetune(make_base_lm(tmp_path / "b6", layers=6), tmp_path / "deep", seed=9)
    with pytest.raises(VlmergeError, match="target has 4 layers, ja has 6; give pool.layer_map.ja"):
        Pool(target=str(tiny.llava), donors={"ja": str(deep)}, base=str(tiny.base))
    pool = Pool(target=str(tiny.llava), donors={"ja": str(deep)}, base=str(tiny.base),
                layer_map={"ja": [0, 2, 3, 5]}, allow_vocab_mismatch=True, verbose=False)  # fmt: skip
    plan = {p.name: p for p in pool.plan.tensors}
    assert plan["model.layers.1.mlp.up_proj.weight"].source_keys[1] == "model.layers.2.mlp.up_proj.weight"
    assert "model.layers.1.mlp.up_proj.weight" in pool.plan.unused["ja"]  # donor layers 1 and 4 are listed
    with pytest.raises(VlmergeError, match=r"layer_map.ja: layers \[7\] outside 0..5"):
        Pool(target=str(tiny.llava), donors={"ja": str(deep)}, base=str(tiny.base), layer_map={"ja": [0, 1, 2, 7]})


@pytest.mark.parametrize(
    ("layer_map", "message"),
    [
        ("ja", "pool.layer_map = 'ja': give a mapping {DONOR: [DONOR layer for each target layer, ...]}"),
        ([0, 1, 2, 3], "pool.layer_map = [0, 1, 2, 3]: give a mapping"),
        ({"ja": 3}, "pool.layer_map.ja = 3: give a list of ja layer indices (ints), one for each target layer"),
        ({"ja": "0123"}, "pool.layer_map.ja = '0123': give a list of ja layer indices"),
        ({"ja": [0, "1", 2, 3]}, "pool.layer_map.ja = [0, '1', 2, 3]: give a list of ja layer indices"),
        ({"ja": [True, 1, 2, 3]}, "pool.layer_map.ja = [True, 1, 2, 3]: give a list of ja layer indices"),
        ({"jp": [0, 1, 2, 3]}, "pool.layer_map names 'jp', which is not a donor or the base (['ja', 'base'])"),
    ],
)  # fmt: skip
def test_layer_map_of_the_wrong_shape_names_the_entry_before_opening_models(layer_map, message):
    with pytest.raises(VlmergeError) as err:  # the models do not exist: refused before they are opened
        Pool(target="/nonexistent/vlm", donors={"ja": "/nonexistent/ja"}, layer_map=layer_map, verbose=False)
    assert message in str(err.value)


def test_layer_map_of_the_wrong_length_names_the_entry(tiny):
    with pytest.raises(VlmergeError) as err:
        Pool(target=str(tiny.llava), donors={"ja": str(tiny.ja)}, base=str(tiny.base), layer_map={"ja": [0, 1]},
             verbose=False)  # fmt: skip
    assert "pool.layer_map.ja = [0, 1] has 2 entries; the target tower has 4 layers" in str(err.value)


def test_missing_tensor_is_listed(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(tiny.ja, partial)
    state = load_file(partial / "model.safetensors")
    del state["model.layers.2.self_attn.k_proj.weight"]
    save_file(state, partial / "model.safetensors")
    with pytest.raises(VlmergeError, match=r"unmapped target-tower tensors: model.layers.2.self_attn.k_proj.weight"):
        Pool(target=str(tiny.llava), donors={"ja": str(partial)}, base=str(tiny.base))


def test_vocabulary_mismatch_refused_unless_allowed(tiny, tmp_path):
    other = tmp_path / "other_vocab"
    shutil.copytree(tiny.ja, other)
    build_tokenizer(vocab_order_seed=3).save_pretrained(other)
    with pytest.raises(VlmergeError, match="vocabulary mismatch between target and ja: .* allow_vocab_mismatch=true"):
        Pool(target=str(tiny.llava), donors={"ja": str(other)}, base=str(tiny.base))
    Pool(target=str(tiny.llava), donors={"ja": str(other)}, base=str(tiny.base), allow_vocab_mismatch=True)


def test_pickle_refused_without_opt_in(tiny, tmp_path):
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny.ja, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(VlmergeError, match="only pickle checkpoints .* allow_pickle=true"):
        Pool(target=str(tiny.llava), donors={"ja": str(pickled)}, base=str(tiny.base))
    pool = Pool(target=str(tiny.llava), donors={"ja": str(pickled)}, base=str(tiny.base), allow_pickle=True)
    assert len(pool.plan.tensors) == 39


def test_export_failure_leaves_nothing(tiny, tmp_path, monkeypatch):
    pool = Pool(target=str(tiny.llava), donors={"ja": str(tiny.ja)}, base=str(tiny.base), verbose=False)
    recipe = Recipe.from_dict({"op": "ties", "sources": ["target", "ja"], "rules": [{"weight": 0.5}]})
    import vlmerge.models.export as export

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", boom)
    with pytest.raises(OSError):
        export_recipe(pool, recipe, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_recipe_sources_must_match_pool(tiny, tmp_path):
    pool = Pool(target=str(tiny.llava), donors={"ja": str(tiny.ja)}, base=str(tiny.base), verbose=False)
    recipe = Recipe.from_dict({"op": "ties", "sources": ["target", "jp"]})
    with pytest.raises(VlmergeError, match=r"recipe sources \['target', 'jp'\] do not match"):
        export_recipe(pool, recipe, tmp_path / "out")


def test_missing_shard_is_named(tiny, tmp_path):
    pool = Pool(target=str(tiny.ja), donors={}, base=str(tiny.base), verbose=False)
    sharded = export_recipe(pool, Recipe.from_dict({"op": "linear", "sources": ["target"]}), tmp_path / "sharded",
                            max_shard_size=20_000)  # fmt: skip
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(VlmergeError, match=f"shard {shard.name} .* is missing"):
        Pool(target=str(tiny.llava), donors={"ja": str(sharded)}, base=str(tiny.base))
    (tiny.root / "no_config").mkdir(exist_ok=True)
    with pytest.raises(VlmergeError, match="missing config.json in .*no_config"):
        Pool(target=str(tiny.llava), donors={"ja": str(tiny.root / "no_config")}, base=str(tiny.base))


def tree(folder) -> dict:
    """Every path under `folder`, hidden ones too, with each file's bytes (None for a folder or link)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() and not p.is_symlink() else None
            for p in folder.rglob("*")}  # fmt: skip


def test_cli_refuses_an_output_that_is_a_file_even_with_overwrite(tiny, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny)
    user = tmp_path / "userfile.txt"
    user.write_text("keep me")
    before = tree(tmp_path)
    done = merge_cli(f"recipe={recipe}", f"output_dir={user}", "overwrite=true")
    assert done.returncode == 2
    assert f"error: output dir {user} exists and is not a directory; choose another path" in done.stderr
    assert done.stderr.count("error:") == 1 and "Traceback" not in done.stderr
    assert tree(tmp_path) == before  # the file as it was, no hidden `.userfile.txt.*` left


@pytest.mark.parametrize("overwrite", [True, False])
@pytest.mark.parametrize("under", [False, True])
def test_output_that_is_or_lies_under_a_file_is_refused(tiny, tmp_path, overwrite, under):
    pool = Pool(target=str(tiny.llava), donors={"ja": str(tiny.ja)}, base=str(tiny.base), verbose=False)
    recipe = Recipe.from_dict({"op": "ties", "sources": ["target", "ja"], "rules": [{"weight": 0.5}]})
    user = tmp_path / "userfile.txt"
    user.write_text("keep me")
    out = user / "merged" if under else user
    where = f" cannot be created: {user}" if under else ""
    with pytest.raises(VlmergeError) as err:
        export_recipe(pool, recipe, out, overwrite=overwrite)
    assert str(err.value) == f"output dir {out}{where} exists and is not a directory; choose another path"
    assert tree(tmp_path) == {"userfile.txt": b"keep me"}


def input_models(tiny, root) -> dict:
    """Copies of the pool's models (the shared `tiny` ones must survive a failing test)."""
    return {role: shutil.copytree(src, root / "models" / role)
            for role, src in (("target", tiny.llava), ("ja", tiny.ja), ("base", tiny.base))}  # fmt: skip


def test_cli_refuses_to_overwrite_an_input_model(tiny, tmp_path):
    models = input_models(tiny, tmp_path)
    pool = {"target": str(models["target"]), "donors": {"ja": str(models["ja"])}, "base": str(models["base"])}
    recipe = write_recipe(tmp_path / "r.yaml", tiny, pool=pool)
    before = tree(tmp_path)
    done = merge_cli(f"recipe={recipe}", f"output_dir={models['target']}", "overwrite=true")
    assert done.returncode == 2
    target = models["target"].resolve()
    assert (f"error: output dir {models['target']} ({target}) overlaps the target model folder {target}; "
            "choose an output_dir outside the input models") in done.stderr  # fmt: skip
    assert done.stderr.count("error:") == 1 and "Traceback" not in done.stderr
    assert tree(tmp_path) == before


@pytest.mark.parametrize(("out", "role"), [("ja", "donor ja"), ("ja/merged", "donor ja"), (".", "target"),
                                           ("link", "base"), ("link/merged", "base")])  # fmt: skip
def test_output_overlapping_an_input_model_is_refused(tiny, tmp_path, out, role):
    models = input_models(tiny, tmp_path)
    (tmp_path / "models" / "link").symlink_to(models["base"], target_is_directory=True)
    pool = Pool(target=str(models["target"]), donors={"ja": str(models["ja"])}, base=str(models["base"]),
                verbose=False)  # fmt: skip
    recipe = Recipe.from_dict({"op": "ties", "sources": ["target", "ja"], "rules": [{"weight": 0.5}]})
    before = tree(tmp_path)
    output_dir = tmp_path / "models" / out
    folder = models[role.removeprefix("donor ")].resolve()
    with pytest.raises(VlmergeError) as err:
        export_recipe(pool, recipe, output_dir, overwrite=True)
    assert str(err.value).startswith(f"output dir {output_dir} ({output_dir.resolve()}) overlaps the {role} model "
                                     f"folder {folder}; ")  # fmt: skip
    assert tree(tmp_path) == before


def test_overwriting_a_link_to_a_folder_replaces_the_link_only(tmp_path):
    from vlmerge.models.export import staged_dir

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "f.txt").write_text("mine")
    link = tmp_path / "out"
    link.symlink_to(kept, target_is_directory=True)
    with staged_dir(link, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert not link.is_symlink() and (link / "new.txt").read_text() == "new"
    assert (kept / "f.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "out"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give output_dir=PATH"),
        (["output_dir={out}", "max_shard_size=lots"], "max_shard_size = 'lots': give a positive size"),
        (["output_dir={out}", "max_shard_size=-5"], "max_shard_size = -5: give a positive size"),
        (["output_dir={out}", "seed=abc"], "seed = 'abc': give an integer"),
        (["output_dir={out}", "device=gpu"], "unknown device 'gpu'"),
    ],
)
def test_cli_bad_settings_are_refused_before_the_pool_opens(tiny, tmp_path, args, message):
    recipe = write_recipe(tmp_path / "r.yaml", tiny)
    out = tmp_path / "a" / "out"
    done = merge_cli(f"recipe={recipe}", *(a.format(out=out) for a in args))
    assert done.returncode == 2 and message in done.stderr
    assert done.stderr.count("error:") == 1 and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_shard_sizes():
    from vlmerge.models.export import parse_size

    assert [parse_size(s) for s in ("2GB", "500MB", "10KB", "123B", 1000, "1.5GB")] == [
        2 * 10**9, 5 * 10**8, 10**4, 123, 1000, 15 * 10**8]
