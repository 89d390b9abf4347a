"""Batched generation on tiny random models of every family: batching, stop strings, seeds, OOM, reuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmerge.errors import VlmergeError
from vlmerge.eval.generate import GenerationSettings, StopOnStrings, cut_at_stop, generate
from vlmerge.eval.loading import load_model
from vlmerge.models.source import ModelRef

QUESTIONS = [
    "what colour is the circle ?",
    "how many",
    "赤 丸 は いくつ ですか ？ 答え",
    "left",
    "is there a red square on the top left and a blue triangle on the right ?",
]
FAMILIES = ("llava", "llava_next", "composite", "base")


def noise_image(seed: int, size: int = 32) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def bundles(tiny):
    out = {}
    for family in FAMILIES:
        folder = getattr(tiny, family)
        assert folder is not None, f"the tiny {family} fixture is missing"
        out[family] = load_model(ModelRef(str(folder), dtype="float32", device="cpu"))
    return out


def inputs_for(bundle):
    if not bundle.is_vlm:
        return [f"Q: {q} A:" for q in QUESTIONS], None
    prompts = [f"{bundle.image_token}\nQ: {q} A:" for q in QUESTIONS]
    # LLaVA-NeXT's anyres path gets images of two shapes (different numbers of image tokens per prompt)
    sizes = [32, 64, 32, 48, 32] if bundle.family == "llava_next" else [32] * len(QUESTIONS)
    return prompts, [noise_image(i, size) for i, size in enumerate(sizes)]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_equals_unbatched(bundles, family):
    bundle = bundles[family]
    prompts, images = inputs_for(bundle)
    settings = GenerationSettings(max_new_tokens=8)
    batched = generate(bundle, prompts, images, GenerationSettings(max_new_tokens=8, batch_size=3))
    single = generate(bundle, prompts, images, GenerationSettings(max_new_tokens=8, batch_size=1))
    assert batched == single
    assert sum(bool(text) for text in batched) >= 3  # the tiny models say something: the test compares text
    assert generate(bundle, prompts, images, settings) == batched  # deterministic, and order restored


def test_text_prompts_on_a_vlm_and_beams(bundles):
    bundle = bundles["llava"]
    settings = GenerationSettings(max_new_tokens=6, num_beams=3, repetition_penalty=1.5, batch_size=2)
    prompts = [f"Q: {q} A:" for q in QUESTIONS[:3]]
    first = generate(bundle, prompts, None, settings)
    assert first == generate(bundle, prompts, None, settings)
    assert len(first) == 3


def test_stop_strings_end_generation_early(bundles):
    bundle = bundles["base"]
    prompts, _ = inputs_for(bundle)
    free = generate(bundle, prompts, None, GenerationSettings(max_new_tokens=12, batch_size=5))
    words = free[0].split()
    assert len(words) >= 6
    stop = words[3]
    stopped = generate(
        bundle, prompts, None, GenerationSettings(max_new_tokens=12, batch_size=5, stop=(stop,))
    )
    for full, short in zip(free, stopped):
        assert full.startswith(short)  # greedy: stopping only truncates
        assert cut_at_stop(short, (stop,)) == cut_at_stop(full, (stop,))
        if stop in full:
            assert short.endswith(stop) or short.rstrip().endswith(stop)
    assert len(stopped[0]) < len(free[0])


def test_stop_criterion_checks_only_new_text():
    class Words:
        def batch_decode(self, rows, skip_special_tokens=True):
            return [" ".join(str(int(t)) for t in row) for row in rows]

    criterion = StopOnStrings(Words(), ["7"], prompt_length=2)
    ids = torch.tensor([[7, 7, 1, 2], [1, 2, 3, 7]])
    assert criterion(ids, None).tolist() == [False, True]


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("a\nb Response: c", ("Response:", "\n")) == "a"
    assert cut_at_stop("abc", ("x",)) == "abc"


def test_sampling_is_seeded(bundles):
    bundle = bundles["base"]
    prompts, _ = inputs_for(bundle)
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.5, seed=3, batch_size=5)
    assert generate(bundle, prompts, None, settings) == generate(bundle, prompts, None, settings)
    other = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.5, seed=4, batch_size=5)
    assert generate(bundle, prompts, None, other) != generate(bundle, prompts, None, settings)


def test_out_of_memory_names_half_the_batch(bundles, monkeypatch):
    bundle = bundles["base"]

    def oom(**kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bundle.model, "generate", oom)
    prompts, _ = inputs_for(bundle)
    with pytest.raises(VlmergeError, match=r"batch of 4 prompts.*task\.batch_size=2"):
        generate(bundle, prompts, None, GenerationSettings(batch_size=4))
    monkeypatch.setattr(
        bundle.model, "generate", lambda **kw: (_ for _ in ()).throw(RuntimeError("out of memory"))
    )
    with pytest.raises(VlmergeError, match="single prompt"):
        generate(bundle, prompts[:1], None, GenerationSettings(batch_size=1))


def test_out_of_memory_while_moving_inputs(bundles, monkeypatch):
    def oom(prompts, images):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(type(bundles["llava"]), "encode", lambda self, prompts, images: oom(prompts, images))
    prompts, images = inputs_for(bundles["llava"])
    with pytest.raises(VlmergeError, match=r"batch of 5 prompts.*task\.batch_size=2"):
        generate(bundles["llava"], prompts, images, GenerationSettings(batch_size=8))


def test_other_runtime_errors_are_not_disguised(bundles, monkeypatch):
    bundle = bundles["base"]
    monkeypatch.setattr(
        bundle.model, "generate", lambda **kw: (_ for _ in ()).throw(RuntimeError("shape bug"))
    )
    with pytest.raises(RuntimeError, match="shape bug"):
        generate(bundle, ["Q: left A:"], None, GenerationSettings())


def test_images_for_a_text_model_are_refused(bundles):
    with pytest.raises(VlmergeError, match="text-only"):
        generate(bundles["base"], ["Q: left A:"], [noise_image(0)])


@pytest.mark.parametrize(
    "bad", [{"max_new_tokens": 0}, {"num_beams": 1.5}, {"batch_size": True}, {"top_p": 2.0}, {"stop": ("",)}]
)
def test_bad_settings_are_refused(bad):
    with pytest.raises(VlmergeError, match="generation setting"):
        GenerationSettings(**bad)


def test_weights_rewritten_in_place_are_seen_by_the_next_call(tiny):
    """The search rewrites the tower between evaluations: nothing derived from the old weights may survive."""
    bundle = load_model(ModelRef(str(tiny.composite)))
    prompts, images = inputs_for(bundle)
    settings = GenerationSettings(max_new_tokens=8, batch_size=5)
    before = generate(bundle, prompts, images, settings)
    original = {name: p.detach().clone() for name, p in bundle.model.language_model.named_parameters()}
    with torch.no_grad():
        for param in bundle.model.language_model.parameters():
            param.mul_(-1.0)
    flipped = generate(bundle, prompts, images, settings)
    fresh = load_model(ModelRef(str(tiny.composite)))
    with torch.no_grad():
        for param in fresh.model.language_model.parameters():
            param.mul_(-1.0)
    assert flipped == generate(fresh, prompts, images, settings)
    assert flipped != before
    with torch.no_grad():
        for name, param in bundle.model.language_model.named_parameters():
            param.copy_(original[name])
    assert generate(bundle, prompts, images, settings) == before
