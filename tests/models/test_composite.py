"""Composite VLM: folder format, image-token splicing, generation, loading errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.fixtures.composite import make_composite, make_tiny_mistral_dir
from vlmerge.errors import VlmergeError
from vlmerge.models.composite import (
    LANGUAGE_DIR,
    MARKER,
    OPENAI_CLIP_MEAN,
    PROJECTOR_FILE,
    VISION_FILE,
    CompositeVLM,
    is_composite_dir,
)
from vlmerge.models.composite_processor import CompositeProcessor

PROMPTS = ["<image> what colour is the circle ?", "<image> how many"]


def noise_image(seed: int, size: int = 40) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return make_composite(tmp_path_factory.mktemp("composite") / "vlm", seed=0)


@pytest.fixture(scope="module")
def vlm(vlm_dir):
    return CompositeVLM.from_pretrained(vlm_dir).eval(), CompositeProcessor.from_pretrained(vlm_dir)


def test_folder_layout_and_round_trip(vlm_dir, vlm, tmp_path):
    model, processor = vlm
    assert is_composite_dir(vlm_dir) and not is_composite_dir(vlm_dir / LANGUAGE_DIR)
    assert {p.name for p in vlm_dir.iterdir()} == {MARKER, VISION_FILE, PROJECTOR_FILE, LANGUAGE_DIR}
    assert model.num_image_tokens == 16  # (32 / 8) ** 2 patches
    batch = processor(PROMPTS, images=[noise_image(1), noise_image(2)])
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path / "copy")
    reloaded = CompositeVLM.from_pretrained(tmp_path / "copy").eval()
    with torch.no_grad():
        after = reloaded(**batch).logits
    assert torch.equal(before, after)
    assert json.loads((tmp_path / "copy" / MARKER).read_text()) == json.loads((vlm_dir / MARKER).read_text())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_language_model_folder_is_an_ordinary_causal_lm(vlm_dir, vlm):
    model, _ = vlm
    lm = AutoModelForCausalLM.from_pretrained(vlm_dir / LANGUAGE_DIR)
    tokenizer = AutoTokenizer.from_pretrained(vlm_dir / LANGUAGE_DIR)
    assert type(lm).__name__ == "MistralForCausalLM"
    assert tokenizer.convert_tokens_to_ids("<image>") == model.image_token_id
    assert "<image>" in tokenizer.all_special_tokens
    assert lm.get_input_embeddings().num_embeddings == len(tokenizer)
    ids = tokenizer(["what colour is the circle ?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids).logits, model(input_ids=ids).logits)


def test_wraps_an_existing_llm_with_one_extra_vocab_row(tmp_path):
    llm_dir = make_tiny_mistral_dir(tmp_path / "llm", seed=3)
    vlm_dir = make_composite(tmp_path / "vlm", llm_dir, seed=0)
    llm = AutoModelForCausalLM.from_pretrained(llm_dir)
    tower = AutoModelForCausalLM.from_pretrained(vlm_dir / LANGUAGE_DIR)
    rows = llm.get_input_embeddings().num_embeddings
    assert tower.get_input_embeddings().weight.shape == (rows + 1, 32)
    assert tower.lm_head.weight.shape == (rows + 1, 32)
    assert torch.equal(tower.get_input_embeddings().weight[:rows], llm.get_input_embeddings().weight)
    assert torch.equal(tower.model.layers[1].mlp.up_proj.weight, llm.model.layers[1].mlp.up_proj.weight)
    assert CompositeVLM.from_pretrained(vlm_dir).image_token_id == rows


def test_batched_left_padded_greedy_equals_per_item(vlm):
    model, processor = vlm
    images = [noise_image(1), noise_image(2)]
    batch = processor(PROMPTS, images=images)
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][:, -1].all()  # left padding
    together = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert together.shape == (2, 6)
    for i, (prompt, image) in enumerate(zip(PROMPTS, images, strict=True)):
        alone = model.generate(**processor([prompt], images=[image]), max_new_tokens=6, do_sample=False)
        assert torch.equal(alone[0], together[i])


def test_images_change_the_output(vlm):
    model, processor = vlm
    prompt = ["<image> what colour is the circle ?"]
    with torch.no_grad():
        first = model(**processor(prompt, images=[noise_image(1)])).logits
        again = model(**processor(prompt, images=[noise_image(1)])).logits
        other = model(**processor(prompt, images=[noise_image(7)])).logits
    assert torch.equal(first, again)
    assert (first[0, -1] - other[0, -1]).abs().max() > 1e-4


def test_image_token_count_mismatch_is_refused(vlm):
    model, processor = vlm
    batch = processor(["<image> how many"], images=[noise_image(1)])
    two_images = torch.cat([batch["pixel_values"]] * 2)
    with pytest.raises(VlmergeError, match=r"per row \[16\] .* 2 image\(s\) x 16 tokens = 32"):
        model(input_ids=batch["input_ids"], pixel_values=two_images)
    with pytest.raises(VlmergeError, match=r"per row \[16\] .* 0 image\(s\)"):
        model.generate(input_ids=batch["input_ids"], max_new_tokens=2)
    img, word = model.image_token_id, 7
    split = torch.tensor([[img] * 24 + [word] * 8, [img] * 8 + [word] * 24])  # 32 tokens, no 2 whole images
    with pytest.raises(VlmergeError, match=r"per row \[24, 8\]"):
        model(input_ids=split, pixel_values=two_images)
    with pytest.raises(VlmergeError, match=r"1 <image> but 2 image"):
        processor(["<image> how many"], images=[noise_image(1), noise_image(2)])


def test_text_only_generation_matches_the_bare_language_model(vlm):
    model, processor = vlm
    batch = processor(["what colour is the circle ?", "how many"])
    assert "pixel_values" not in batch
    new = model.generate(**batch, max_new_tokens=5, do_sample=False)
    plain = model.language_model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert torch.equal(new, plain[:, batch["input_ids"].shape[1]:])


def test_generation_kwargs_pass_through(vlm):
    model, processor = vlm
    batch = processor(["<image> what colour is the circle ?"], images=[noise_image(1)])
    greedy = model.generate(**batch, max_new_tokens=6, do_sample=False)
    stop_id = int(greedy[0, 2])
    first_stop = greedy[0].tolist().index(stop_id)
    stopped = model.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=stop_id)
    assert torch.equal(stopped[0], greedy[0, : first_stop + 1])
    beams = model.generate(**batch, max_new_tokens=4, num_beams=3, repetition_penalty=1.5, do_sample=False)
    assert beams.shape[0] == 1 and 1 <= beams.shape[1] <= 4
    penalised = model.generate(**batch, max_new_tokens=6, do_sample=False, repetition_penalty=1e4)
    new_ids = penalised[0].tolist()
    assert len(set(new_ids)) == len(new_ids)  # no token repeats under a huge penalty ...
    assert not set(new_ids) & set(batch["input_ids"][0].tolist())  # ... nor copies the prompt (LLaVA-like)


def test_labels_ignore_image_positions(vlm):
    model, processor = vlm
    batch = processor(["<image> what colour is the circle ?"], images=[noise_image(1)])
    labels = batch["input_ids"].clone()
    with torch.no_grad():
        out = model(**batch, labels=labels)
        masked = labels.masked_fill(labels == model.image_token_id, -100)
        expected = model.language_model(inputs_embeds=model.embed(batch["input_ids"], batch["pixel_values"]),
                                        labels=masked).loss
    assert torch.isclose(out.loss, expected)


def test_penultimate_patch_tokens_skip_the_last_block(tmp_path):
    vlm_dir = make_composite(tmp_path / "vlm", layers=2, vision_feature="penultimate_patch_tokens")
    model = CompositeVLM.from_pretrained(vlm_dir).eval()
    pixels = CompositeProcessor.from_pretrained(vlm_dir)(["<image>"], images=[noise_image(4)])["pixel_values"]
    vision = model.vision_encoder
    with torch.no_grad():
        x = vision._embeds(pixels)
        x = vision.transformer.resblocks[0](x)
        expected = model.projector(x[:, 1:])
        assert torch.allclose(model.image_features(pixels), expected, atol=1e-6)


def test_missing_vision_weights_are_named(vlm_dir, tmp_path):
    broken = shutil.copytree(vlm_dir, tmp_path / "broken")
    (broken / VISION_FILE).unlink()
    with pytest.raises(VlmergeError, match=str(broken / VISION_FILE)):
        CompositeVLM.from_pretrained(broken)


def test_bad_json_and_bad_tensors_are_named(vlm_dir, tmp_path):
    broken = shutil.copytree(vlm_dir, tmp_path / "broken")
    (broken / MARKER).write_text("{not json")
    with pytest.raises(VlmergeError, match=str(broken / MARKER)):
        CompositeVLM.from_pretrained(broken)
    with pytest.raises(VlmergeError, match=str(broken / MARKER)):
        CompositeProcessor.from_pretrained(broken)
    shutil.copy(vlm_dir / MARKER, broken / MARKER)
    config = json.loads((broken / MARKER).read_text())
    config["vision"]["width"] = 48
    config["vision"]["heads"] = 3
    config["projector"]["in_features"] = 48
    (broken / MARKER).write_text(json.dumps(config))
    with pytest.raises(VlmergeError, match=r"vision_encoder.safetensors: tensor \S+ has shape .* needs"):
        CompositeVLM.from_pretrained(broken)


def test_save_refuses_to_replace_a_foreign_folder(vlm, tmp_path):
    model, _ = vlm
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(VlmergeError, match="not a vlmerge composite folder"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_processor_round_trip_and_chat_template(vlm_dir, tmp_path):
    folder = shutil.copytree(vlm_dir, tmp_path / "copy")
    processor = CompositeProcessor.from_pretrained(folder)
    with pytest.raises(VlmergeError, match="no chat template"):
        processor.apply_chat_template([{"role": "user", "content": "how many"}])
    template = "{% for m in messages %}USER: {{ m['content'] }} ASSISTANT:{% endfor %}"
    processor.tokenizer.chat_template = template
    before = processor(["<image>"], images=[noise_image(1)])["pixel_values"]
    processor.image_mean = (0.0, 0.0, 0.0)
    processor.save_pretrained(folder)
    again = CompositeProcessor.from_pretrained(folder)
    assert json.loads((folder / MARKER).read_text())["image_mean"] == [0.0] * 3
    after = again(["<image>"], images=[noise_image(1)])["pixel_values"]
    std = torch.tensor(again.image_std)[:, None, None]
    assert torch.allclose(after - before, torch.tensor(OPENAI_CLIP_MEAN)[:, None, None] / std, atol=1e-5)
    chat = again.apply_chat_template([{"role": "user", "content": "<image> how many"}], tokenize=False)
    assert chat == "USER: <image> how many ASSISTANT:"
    assert again(chat, images=[noise_image(1)])["input_ids"].shape == (1, 16 + 4)
    with pytest.raises(VlmergeError, match="not a vlmerge composite"):
        again.save_pretrained(tmp_path / "empty")


def test_load_in_another_dtype(vlm_dir, vlm):
    model = CompositeVLM.from_pretrained(vlm_dir, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    batch = vlm[1](["<image> how many"], images=[noise_image(1)])
    with torch.no_grad():
        low, full = model(**batch).logits, vlm[0](**batch).logits
    assert low.dtype == torch.bfloat16 and torch.allclose(low.float(), full, atol=0.1)
