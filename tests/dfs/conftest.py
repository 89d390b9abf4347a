"""DFS fixtures: towers that do not fit (other heads, other width), a post-norm family, and helpers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tests.fixtures.hf_models import TEXT
from tests.fixtures.tokenizer import build_tokenizer
from vlmerge.dfs.path import EmptyPathError, LayerPath, PathSpec

IMAGE_PROMPT = "<image> what colour is the circle"
WINDOWED = dict(use_sliding_window=True, sliding_window=4, max_window_layers=2)


def _save(model_cls, config_cls, path, seed: int, **overrides):
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    config = config_cls(vocab_size=len(tokenizer), **{**TEXT, **overrides}, **special)
    model_cls(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def odd(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("dfs_odd")
    return SimpleNamespace(
        heads=_save(MistralForCausalLM, MistralConfig, root / "heads", 7, num_key_value_heads=4),
        wide=_save(
            MistralForCausalLM,
            MistralConfig,
            root / "wide",
            8,
            hidden_size=48,
            num_attention_heads=6,
            num_key_value_heads=2,
        ),  # fmt: skip
        olmo=_save(Olmo2ForCausalLM, Olmo2Config, root / "olmo", 9),
        olmo_b=_save(Olmo2ForCausalLM, Olmo2Config, root / "olmo_b", 10),
        # A's layers 2, 3 attend to a window of 4 tokens: layer_types ["full", "full", "sliding", "sliding"]
        windowed=_save(Qwen2ForCausalLM, Qwen2Config, root / "windowed", 11, **WINDOWED),
        windowed_b=_save(
            Qwen2ForCausalLM, Qwen2Config, root / "windowed_b", 12, **{**WINDOWED, "max_window_layers": 3}
        ),  # B: only layer 3 slides
    )


def random_path(depth_a: int, depth_b: int, seed: int, *, repeats: int = 2) -> LayerPath:
    """A random candidate of the genome: about 40% of the slots on, scalings in [0.25, 4]."""
    spec = PathSpec(depth_a=depth_a, depth_b=depth_b, repeats=repeats, scaling="full")
    rng = np.random.default_rng(seed)
    while True:
        x = np.concatenate([rng.normal(-0.25, 1.0, spec.n_slots), rng.normal(0.0, 0.6, spec.n_scale_genes)])
        try:
            path = spec.decode(x)
        except EmptyPathError:
            continue
        if len(path.layers) >= 3:
            return path


def noise_image(seed: int, size: int = 32) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def ids(seed: int, batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(4, 80, (batch, length), generator=torch.Generator().manual_seed(seed))


def load_target(folder, family: str, seed: int = 0):
    """(model in fp32 eval mode, a batch with an image for the VLMs) for a tiny target folder."""
    from transformers import (
        AutoModelForCausalLM,
        AutoProcessor,
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
    )

    from vlmerge.models.composite import CompositeVLM
    from vlmerge.models.composite_processor import CompositeProcessor

    if family == "causal_lm":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), {
            "input_ids": ids(seed)
        }
    if family == "composite":
        model = CompositeVLM.from_pretrained(folder, dtype=torch.float32).eval()
        return model, dict(
            CompositeProcessor.from_pretrained(folder)([IMAGE_PROMPT], images=[noise_image(seed)])
        )
    cls = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}[family]
    model = cls.from_pretrained(folder, dtype=torch.float32).eval()
    batch = AutoProcessor.from_pretrained(folder)(text=[IMAGE_PROMPT], images=[noise_image(seed)],
                                                  return_tensors="pt")  # fmt: skip
    return model, dict(batch)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits
