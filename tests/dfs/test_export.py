"""Export: the exported model's logits equal the path model's (fp32, max |diff| <= 1e-5), it loads with its
ordinary class (no trust_remote_code), VLMs generate from an image, and bad exports are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

from tests.dfs.conftest import load_target, logits, random_path
from vlmerge.dfs.export import PATH_FILE, export_path
from vlmerge.dfs.model import PathModel
from vlmerge.dfs.path import LayerPath
from vlmerge.errors import VlmergeError
from vlmerge.models.composite import PROJECTOR_FILE, VISION_FILE, CompositeVLM

ATOL = 1e-5  # fp32; observed ~2e-7 (the fold on weights vs on activations rounds differently)
CLASSES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
           "composite": CompositeVLM.from_pretrained}  # fmt: skip


def load_exported(folder, family: str):
    if family == "causal_lm":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if family == "composite":
        return CompositeVLM.from_pretrained(folder, dtype=torch.float32).eval()
    return CLASSES[family].from_pretrained(folder, dtype=torch.float32).eval()


CASES = [("ja", "math", (11, 12, 13)), ("math", "ja", (15,)), ("qwen_ft", "qwen_base", (14,))]


@pytest.mark.parametrize(("target", "donor", "seeds"), CASES)
def test_random_paths_export_equal_the_path_model(tiny, tmp_path, target, donor, seeds):
    """Mistral A with a Llama donor, Llama A with a Mistral donor, Qwen2 (q/k/v biases, layer_types)."""
    model, batch = load_target(getattr(tiny, target), "causal_lm")
    pm = PathModel(model, getattr(tiny, donor))
    for seed in seeds:
        path = random_path(4, 4, seed=seed, repeats=3)
        assert any(s != 1.0 for s in path.scales) and any(i >= 4 for i in path.layers)
        with pm.installed(path):
            expected = logits(model, batch)
        out = export_path(pm, path, tmp_path / f"{target}-{seed}", target=getattr(tiny, target))
        exported = load_exported(out, "causal_lm")
        assert exported.config.num_hidden_layers == len(path.layers) == len(exported.model.layers)
        assert (logits(exported, batch) - expected).abs().max().item() <= ATOL
        record = yaml.safe_load((out / PATH_FILE).read_text())
        assert LayerPath.from_dict(record["path"]) == path
        if target == "qwen_ft":
            assert exported.config.layer_types == ["full_attention"] * len(path.layers)


def test_sliding_window_layer_types_follow_the_path(odd, tmp_path):
    model, batch = load_target(odd.windowed, "causal_lm")
    pm = PathModel(model, odd.windowed_b)
    path = LayerPath((2, 0, 6, 7, 3), (1.5, 0.7, 2.0, 1.3), 4, 4)  # A2 A0 B2 B3 A3
    sliding, full = "sliding_attention", "full_attention"
    types = [sliding, full, full, sliding, sliding]  # each layer keeps its own tower's type
    with pm.installed(path):
        assert model.config.layer_types == types
        expected = logits(model, batch)
        cached = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
    exported = load_exported(export_path(pm, path, tmp_path / "w", target=odd.windowed), "causal_lm")
    assert exported.config.layer_types == types
    assert [layer.self_attn.sliding_window for layer in exported.model.layers] == [4, None, None, 4, 4]
    assert (logits(exported, batch) - expected).abs().max().item() <= ATOL


def test_exported_tensors_are_the_folded_source_layers(tiny, tmp_path):
    model, _ = load_target(tiny.ja, "causal_lm")
    pm = PathModel(model, tiny.math)
    path = LayerPath((0, 6, 0), (2.0, 0.5), 4, 4)  # cumulative 1, 2, 1
    out = export_path(pm, path, tmp_path / "m", target=tiny.ja, max_shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    state = {}
    for file in set(index["weight_map"].values()):
        state.update(load_file(out / file))
    math_state = load_file(tiny.math / "model.safetensors")
    ja_state = load_file(tiny.ja / "model.safetensors")
    assert torch.equal(
        state["model.layers.1.self_attn.q_proj.weight"], math_state["model.layers.2.self_attn.q_proj.weight"]
    )
    assert torch.equal(state["model.layers.1.self_attn.o_proj.weight"],
                       math_state["model.layers.2.self_attn.o_proj.weight"] / 2.0)  # fmt: skip
    assert torch.equal(
        state["model.layers.1.mlp.down_proj.weight"], math_state["model.layers.2.mlp.down_proj.weight"] / 2.0
    )
    assert torch.equal(
        state["model.layers.2.mlp.down_proj.weight"], ja_state["model.layers.0.mlp.down_proj.weight"]
    )
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(state[key], ja_state[key])
    assert sorted(state) == sorted(k for k in ja_state if not k.startswith("model.layers.3"))


@pytest.mark.parametrize("family", ["llava", "llava_next", "composite"])
def test_exported_vlm_loads_with_its_class_and_generates_from_an_image(tiny, tmp_path, family):
    folder = getattr(tiny, family)
    model, batch = load_target(folder, family)
    pm = PathModel(model, tiny.math)
    path = random_path(4, 4, seed=21)
    with pm.installed(path):
        expected = logits(model, batch)
        new = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    out = export_path(pm, path, tmp_path / family, target=folder)
    exported = load_exported(out, family)
    assert (logits(exported, batch) - expected).abs().max().item() <= ATOL
    again = exported.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(again, new) and again.shape[-1] >= 5 and new.shape[-1] >= 5
    if family == "composite":
        assert json.loads((out / "language_model" / "config.json").read_text())["num_hidden_layers"] == len(
            path.layers
        )
        for name in (VISION_FILE, PROJECTOR_FILE):
            assert (out / name).read_bytes() == (folder / name).read_bytes()
    else:
        config = json.loads((out / "config.json").read_text())
        assert config["text_config"]["num_hidden_layers"] == len(path.layers)
        assert config["vision_config"]["num_hidden_layers"] == 1
        original = LlavaForConditionalGeneration if family == "llava" else LlavaNextForConditionalGeneration
        state = original.from_pretrained(folder).state_dict()
        vision = {k: v for k, v in state.items() if "language_model" not in k and "lm_head" not in k}
        assert all(torch.equal(v, exported.state_dict()[k]) for k, v in vision.items())


def test_identity_export_is_tower_a(tiny, tmp_path):
    model, batch = load_target(tiny.llava, "llava")
    pm = PathModel(model, tiny.math)
    out = export_path(pm, LayerPath.identity(4, 4), tmp_path / "id", target=tiny.llava)
    assert torch.equal(logits(load_exported(out, "llava"), batch), logits(model, batch))


def test_post_norm_family_exports_unit_scalings_only(odd, tmp_path):
    model, batch = load_target(odd.olmo, "causal_lm")
    pm = PathModel(model, odd.olmo_b, fold=False)
    with pytest.raises(VlmergeError, match=r"'olmo2' \(Olmo2DecoderLayer\) is not a known pre-norm"):
        export_path(pm, LayerPath((0, 5, 2), (2.0, 1.0), 4, 4), tmp_path / "scaled", target=odd.olmo)
    assert not (tmp_path / "scaled").exists()
    unit = LayerPath((0, 5, 2, 2, 7), (1.0,) * 4, 4, 4)  # nothing to fold: exact for any family
    with pm.installed(unit):
        expected = logits(model, batch)
    out = export_path(pm, unit, tmp_path / "unit", target=odd.olmo)
    assert torch.equal(logits(load_exported(out, "causal_lm"), batch), expected)


def test_bad_exports_are_refused_and_leave_nothing(tiny, tmp_path):
    model, _ = load_target(tiny.ja, "causal_lm")
    pm = PathModel(model, tiny.math)
    path = LayerPath((0, 4), (1e-7,), 4, 4)
    with pytest.raises(VlmergeError, match=r"model.layers.1.mlp.down_proj.weight: dividing by the cumulative "
                                           r"scale 1e-07 leaves values outside torch.float16"):  # fmt: skip
        export_path(pm, path, tmp_path / "half", target=tiny.ja, out_dtype=torch.float16)
    wrong = r"lm_head.weight: the loaded model has shape \(91, 32\), .*llava_next \(92, 32\)"
    with pytest.raises(VlmergeError, match=wrong):
        export_path(pm, path, tmp_path / "wrong", target=tiny.llava_next)
    odd_config = shutil.copytree(tiny.ja, tmp_path / "odd_config")
    config = json.loads((odd_config / "config.json").read_text())
    (odd_config / "config.json").write_text(json.dumps({**config, "window_per_layer": [8, 8, 16, 16]}))
    with pytest.raises(VlmergeError, match=r"per-layer list\(s\) \['window_per_layer'\] would have to grow"):
        export_path(pm, path, tmp_path / "lists", target=odd_config)
    shutil.rmtree(odd_config)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    with pytest.raises(VlmergeError, match="exists and is not empty"):
        export_path(pm, path, tmp_path / "busy", target=tiny.ja)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
