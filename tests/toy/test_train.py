"""Toy trainer: deterministic stages, layer-wise freezing, loadable folders; committed models' relations."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlmerge.errors import VlmergeError
from vlmerge.eval.text import is_japanese
from vlmerge.models.composite import CompositeVLM
from vlmerge.toy import scenes as S
from vlmerge.toy import texts as T
from vlmerge.toy import train as TR
from vlmerge.toy.build import (
    FOLDERS,
    JAPANESE_CUE,
    BuildConfig,
    Stage,
    build_models,
    reader_examples,
    save_models,
    verify_models,
)
from vlmerge.toy.model_configs import LMArch, VisionArch, new_lm
from vlmerge.toy.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "eval_data" / "toy_models"
MICRO = BuildConfig(
    lm=LMArch(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              intermediate_size=64, max_position_embeddings=256),
    vision=VisionArch(width=16, layers=1, heads=2),
    base=Stage(n=40, steps=2, lr=1e-3, seed=1, batch_size=8, warmup=1),
    vision_pretrain=Stage(n=16, steps=2, lr=1e-3, seed=21, batch_size=8, warmup=1),
    vlm=Stage(n=16, steps=2, lr=1e-3, seed=2, layer_lr=(1.0, 0.5), batch_size=8, warmup=1),
    ja=Stage(n=16, steps=2, lr=1e-3, seed=6, layer_lr=(0.0, 1.0), batch_size=8, warmup=1),
    math=Stage(n=16, steps=2, lr=1e-3, seed=8, layer_lr=(1.0, 0.0), batch_size=8, warmup=1),
    threads=1,
)


@pytest.fixture(scope="module")
def micro_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "models"
    save_models(build_models(MICRO, verbose=False), out, MICRO, "test")
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_encode_example_masks_the_prompt_and_expands_images():
    tok = build_tokenizer()
    example = T.Example("vqa", "en", S.VQA_PROMPT.format(question="What colour is the circle?"), " red")
    enc = TR.encode_example(tok, example, image_tokens=4, image=7)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert enc.ids.count(image_id) == 4 and enc.image == 7
    answer = tok(" red", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert list(enc.ids[-len(answer):]) == answer
    assert list(enc.labels) == [TR.IGNORE] * (len(enc.ids) - len(answer)) + answer
    with pytest.raises(VlmergeError, match="<image>"):
        TR.encode_example(tok, example)


def test_batches_are_seeded_full_and_length_grouped():
    lengths = [(i * 7) % 23 for i in range(200)]
    cfg = TR.StageConfig(steps=12, batch_size=8, seed=3)
    first = TR.batches(lengths, cfg)
    assert first == TR.batches(lengths, cfg) and first != TR.batches(lengths, replace(cfg, seed=4))
    assert len(first) == 12 and all(len(b) == 8 for b in first)
    assert len({i for b in first for i in b}) == 96  # within an epoch no example comes twice
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in first) / len(first)
    assert spread < 8  # sorted pools: batches hold similar lengths


def test_layer_profile_freezes_layers_embeddings_and_head():
    tok = build_tokenizer()
    model = new_lm(MICRO.lm, tok, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [TR.encode_example(tok, e) for e in T.japanese_llm_sft(16, 0)]
    TR.train_lm("t", model, tok, data, TR.StageConfig(2, batch_size=4, warmup=1), [0.0, 1.0], verbose=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("model.layers.1.", "model.norm.")) for k in changed)
    assert all(p.requires_grad for p in model.parameters())  # restored for whoever trains next
    with pytest.raises(VlmergeError, match="layer_lr has 3 values"):
        TR.layer_groups(model, [1.0, 1.0, 1.0])


def test_vision_pretraining_learns_and_touches_only_the_encoder():
    tok = build_tokenizer()
    va = MICRO.vision
    vlm = CompositeVLM.build(va.vision_config(), va.projector_config(), new_lm(MICRO.lm, tok, 0),
                             tok.convert_tokens_to_ids("<image>"), seed=0)
    scenes = S.make_scenes(32, 5)
    targets = TR.cell_targets(scenes)
    assert targets.shape == (32, 4, 2)
    assert int((targets[..., 0] > 0).sum()) == sum(len(s.shapes) for s in scenes)
    projector = {k: v.clone() for k, v in vlm.projector.state_dict().items()}
    conv = vlm.vision_encoder.conv1.weight.clone()
    log = TR.pretrain_vision("v", vlm, TR.scene_pixels(scenes), targets, TR.StageConfig(20, 16, 1e-2, 2),
                             verbose=False, log_every=5)
    assert log.losses[-1] < log.losses[0]
    assert not torch.equal(conv, vlm.vision_encoder.conv1.weight)
    assert all(torch.equal(v, vlm.projector.state_dict()[k]) for k, v in projector.items())


def test_normalise_matches_the_processor_transform(micro_world):
    from vlmerge.models.composite_processor import CompositeProcessor

    processor = CompositeProcessor.from_pretrained(micro_world / "vlm_en")
    scene = S.make_scenes(1, 9)[0]
    expected = processor.transform(S.render(scene))
    got = TR.normalise(TR.scene_pixels([scene]), processor.image_mean, processor.image_std)[0]
    assert torch.allclose(got, expected, atol=1e-6)


def test_build_is_deterministic_and_folders_load(micro_world, tmp_path):
    again = save_models(build_models(MICRO, verbose=False), tmp_path / "again", MICRO, "test")
    for name in FOLDERS:
        first = json.loads((micro_world / name / "MANIFEST.json").read_text())["files"]
        second = json.loads((again / name / "MANIFEST.json").read_text())["files"]
        assert first == second, name
    verify_models(micro_world)
    for name in ("base", "lm_ja", "lm_math_en"):
        AutoModelForCausalLM.from_pretrained(micro_world / name)
        AutoTokenizer.from_pretrained(micro_world / name)
    vlm = CompositeVLM.from_pretrained(micro_world / "vlm_en")
    assert vlm.num_image_tokens == (MICRO.vision.image_size // MICRO.vision.patch_size) ** 2


def test_verify_models_names_a_changed_file(micro_world, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(micro_world, copy)
    (copy / "lm_ja" / "config.json").write_text("{}")
    with pytest.raises(VlmergeError, match="lm_ja/config.json: sha256 differs"):
        verify_models(copy)


def test_stage_profiles_leave_frozen_layers_equal_to_the_base(micro_world):
    base = _weights(micro_world / "base")
    ja, math = _weights(micro_world / "lm_ja"), _weights(micro_world / "lm_math_en")
    assert all(torch.equal(ja[k], base[k]) for k in base if k.startswith("model.layers.0."))
    assert all(torch.equal(math[k], base[k]) for k in base if k.startswith("model.layers.1."))
    assert any(not torch.equal(ja[k], base[k]) for k in base if k.startswith("model.layers.1."))


def _check_relations(folder: Path) -> None:
    """Same tokenizer and architecture everywhere; every fine-tune shares the base's embeddings and head and
    differs from it in its layers; the VLM's tower is a Mistral of the same shape."""
    verify_models(folder)
    towers = {name: folder / name for name in ("base", "lm_ja", "lm_math_en")}
    towers["vlm_en"] = folder / "vlm_en" / "language_model"
    tokenizers = {name: (path / "tokenizer.json").read_bytes() for name, path in towers.items()}
    assert len(set(tokenizers.values())) == 1
    configs = {name: json.loads((path / "config.json").read_text()) for name, path in towers.items()}
    for cfg in configs.values():
        cfg.pop("dtype", None)
    assert all(cfg == configs["base"] for cfg in configs.values())
    base = _weights(towers["base"])
    for name in ("vlm_en", "lm_ja", "lm_math_en"):
        tuned = _weights(towers[name])
        assert tuned.keys() == base.keys()
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(tuned[key], base[key]), (name, key)
        assert any(not torch.equal(tuned[k], base[k]) for k in base if ".layers." in k), name


def test_micro_world_relations(micro_world):
    _check_relations(micro_world)


def test_committed_models_load_and_share_the_base():
    _check_relations(COMMITTED)
    manifest = json.loads((COMMITTED / "MANIFEST.json").read_text())
    assert manifest["command"] == "python -m vlmerge.toy.build --out eval_data/toy_models"
    vlm = CompositeVLM.from_pretrained(COMMITTED / "vlm_en")
    assert vlm.num_image_tokens == 16
    for name in FOLDERS:
        size = sum(p.stat().st_size for p in (COMMITTED / name).rglob("*.safetensors"))
        assert size < 8_000_000, name


def test_japanese_reading_answers_echo_the_number_read():
    from vlmerge.toy.build import japanese_examples

    examples = japanese_examples(300, 3, short=True, reading_style="echo")
    reading = [e for e in examples if e.task == "reading"]
    assert reading
    for e in reading:
        number = e.prompt.split("を")[1].split("個")[0].split("本")[0].split("冊")[0].split("枚")[0]
        assert e.completion == f" {number}。答えは{number}です。", e
    plain = japanese_examples(300, 3, short=True, reading_style="plain")
    assert [e.completion for e in plain if e.task == "reading"] == [
        " 答えは" + e.completion.strip().split("。")[0] + "です。" for e in reading]
    with pytest.raises(VlmergeError, match="ja_reading_style"):
        replace(MICRO, ja_reading_style="loud")


def test_vlm_projector_stays_at_its_seeded_init_and_the_tower_learns(micro_world):
    vlm = CompositeVLM.from_pretrained(micro_world / "vlm_en")
    fresh = CompositeVLM.build(MICRO.vision.vision_config(), MICRO.vision.projector_config(),
                               AutoModelForCausalLM.from_pretrained(micro_world / "base"),
                               vlm.config.image_token_id, seed=MICRO.init_seed)
    assert MICRO.vlm_projector_lr == 0.0
    for key, value in fresh.projector.state_dict().items():
        assert torch.equal(vlm.projector.state_dict()[key], value), key
    base = _weights(micro_world / "base")
    tower = _weights(micro_world / "vlm_en" / "language_model")
    assert not torch.equal(tower["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])


def test_base_reader_answers_in_japanese_after_the_cue():
    qa = [e for e in reader_examples(600, 5, reading_fraction=0.2, cue_fraction=0.3) if e.task == "text_qa"]
    cued = [e for e in qa if e.prompt.endswith("\n" + JAPANESE_CUE)]
    plain = [e for e in qa if e.prompt.endswith("\nA:")]
    assert len(cued) + len(plain) == len(qa) and 0.2 < len(cued) / len(qa) < 0.4
    assert all(is_japanese(e.completion) and not e.completion.endswith("です。") for e in cued)
    assert not any(is_japanese(e.completion) for e in plain)
    contexts = {is_japanese(e.prompt.split("\nQ:")[0]) for e in cued}
    questions = {is_japanese(e.prompt.split("\nQ:")[1]) for e in cued}
    assert contexts == questions == {True, False}  # the cue, not the text, picks the answer's language
    none = reader_examples(200, 5, reading_fraction=0.2, cue_fraction=0.0)
    assert not any(e.prompt.endswith(JAPANESE_CUE) for e in none)
    with pytest.raises(VlmergeError, match="reader_cue_fraction"):
        replace(MICRO, reader_cue_fraction=1.5)
