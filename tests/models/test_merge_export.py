"""Merging a VLM's language tower with LLMs, end to end: pool -> recipe -> exported model."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration

from tests.fixtures.hf_models import vision_state
from vlmerge.merge.command import export_recipe
from vlmerge.merge.recipe import Recipe
from vlmerge.models.pool import Pool


def load_all(folder) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def lm_state(folder) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def recipe(op: str, sources=("target", "ja"), rules=(), **kw) -> Recipe:
    return Recipe.from_dict({"op": op, "sources": list(sources), "rules": list(rules), **kw})


@pytest.fixture(scope="module")
def llava_pool(tiny):
    return Pool(target=str(tiny.llava), donors={"ja": str(tiny.ja)}, base=str(tiny.base), verbose=False)


def test_coverage_summary_names_vocab_rows(tiny, capsys):
    Pool(target=str(tiny.llava), donors={"ja": str(tiny.ja)}, base=str(tiny.base))
    out = capsys.readouterr().out
    assert "39 merged from 2 sources (target, ja)" in out
    assert "91 shared rows merged, 1 extra rows kept from the target" in out


@pytest.mark.parametrize("op", ["linear", "task_arithmetic"])
def test_merged_tower_matches_reference_and_vision_is_byte_identical(tiny, llava_pool, tmp_path, op):
    weights = {"target": 0.3, "ja": 0.9}
    rules = [{"source": s, "weight": w} for s, w in weights.items()]
    out = export_recipe(llava_pool, recipe(op, rules=rules), tmp_path / op)

    merged = load_all(out)
    original = load_all(tiny.llava)
    for name, tensor in vision_state(tiny.llava).items():  # vision tower + projector
        assert merged[name].dtype == tensor.dtype
        assert merged[name].numpy().tobytes() == tensor.numpy().tobytes(), name

    base, ja, vlm = lm_state(tiny.base), lm_state(tiny.ja), lm_state(tiny.vlm_lm)
    for key in base:
        disk = "language_model." + key
        rows = base[key].shape[0]
        if op == "linear":  # mergekit's linear: normalised weighted mean of the models themselves
            expected = (0.3 * vlm[key] + 0.9 * ja[key]) / 1.2
        else:  # task arithmetic: base + sum of weighted task vectors
            expected = base[key] + 0.3 * (vlm[key] - base[key]) + 0.9 * (ja[key] - base[key])
        torch.testing.assert_close(merged[disk][:rows], expected, rtol=1e-5, atol=1e-6)
        if merged[disk].shape[0] > rows:  # the <image> row is the target's
            assert torch.equal(merged[disk][rows:], original[disk][rows:])


def test_export_loads_with_transformers_and_generates_from_an_image(llava_pool, tmp_path):
    out = export_recipe(llava_pool, recipe("ties", rules=[{"weight": 0.5, "density": 0.5}]), tmp_path / "m",
                        max_shard_size=20_000)  # several shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (out / "README.md").read_text().count("ties") >= 1
    assert (out / "chat_template.jinja").is_file() and (out / "processor_config.json").is_file()
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor(text=["<image> what colour is the circle"], images=[Image.new("RGB", (32, 32), "red")],
                       return_tensors="pt")  # fmt: skip
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_dare_is_seeded_per_tensor(llava_pool, tmp_path):
    def run(seed: int, name: str):
        r = recipe("dare_ties", rules=[{"weight": 0.5, "density": 0.5}], seed=seed)
        return load_all(export_recipe(llava_pool, r, tmp_path / name))

    first, again, other = run(1, "a"), run(1, "b"), run(2, "c")
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    assert torch.equal(first[key], again[key])
    assert not torch.equal(first[key], other[key])


def test_text_only_path_and_llama_donor(tiny, tmp_path):
    pool = Pool(target=str(tiny.ja), donors={"math": str(tiny.math)}, base=str(tiny.base), verbose=False)
    r = recipe("task_arithmetic", sources=("target", "math"), rules=[{"weight": 1.0}])
    out = export_recipe(pool, r, tmp_path / "text")
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base, ja, math = lm_state(tiny.base), lm_state(tiny.ja), lm_state(tiny.math)
    key = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[key], ja[key] + math[key] - base[key], rtol=1e-5, atol=1e-6)


def test_qwen2_family_merges(tiny, tmp_path):
    pool = Pool(target=str(tiny.qwen_ft), donors={}, base=str(tiny.qwen_base), verbose=False)
    out = export_recipe(pool, recipe("task_arithmetic", sources=("target",), rules=[{"weight": 0.5}]), tmp_path / "q")
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base, ft = lm_state(tiny.qwen_base), lm_state(tiny.qwen_ft)
    key = "model.layers.0.self_attn.q_proj.bias"
    torch.testing.assert_close(merged[key], base[key] + 0.5 * (ft[key] - base[key]), rtol=1e-5, atol=1e-6)


def test_composite_vlm_merge_keeps_vision_files_and_generates(tiny, tmp_path):
    from vlmerge.models.composite import CompositeVLM
    from vlmerge.models.composite_processor import CompositeProcessor

    pool = Pool(target=str(tiny.composite), donors={"ja": str(tiny.ja)}, base=str(tiny.base), verbose=False)
    assert len(pool.plan.tensors) == 39
    r = recipe("task_arithmetic", rules=[{"weight": 0.7}])
    out = export_recipe(pool, r, tmp_path / "composite")
    for name in ("vision_encoder.safetensors", "projector.safetensors", "vlmerge_composite.json"):
        assert (out / name).read_bytes() == (tiny.composite / name).read_bytes(), name
    merged = load_all(out / "language_model")
    base, ja, vlm = lm_state(tiny.base), lm_state(tiny.ja), lm_state(tiny.vlm_lm)
    key = "model.layers.3.mlp.down_proj.weight"
    expected = base[key] + 0.7 * (vlm[key] - base[key]) + 0.7 * (ja[key] - base[key])
    torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6)
    model = CompositeVLM.from_pretrained(out)
    processor = CompositeProcessor.from_pretrained(out)
    inputs = processor(text=["<image> what colour is the circle"], images=[Image.new("RGB", (32, 32), "blue")])
    new = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert new.shape == (1, 3)


def test_llava_next_export_loads_and_generates(tiny, tmp_path):
    from transformers import LlavaNextForConditionalGeneration

    pool = Pool(target=str(tiny.llava_next), donors={"ja": str(tiny.ja)}, base=str(tiny.base), verbose=False)
    out = export_recipe(pool, recipe("dare_ties", rules=[{"weight": 0.8, "density": 0.6}]), tmp_path / "next")
    original = load_all(tiny.llava_next)
    merged = load_all(out)
    assert torch.equal(merged["image_newline"], original["image_newline"])
    model = LlavaNextForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor(text=["<image> how many are there"], images=[Image.new("RGB", (32, 64), "green")],
                       return_tensors="pt")  # fmt: skip
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)
