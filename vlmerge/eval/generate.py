"""Batched generation for every model family: left padding, greedy by default, stop strings, OOM advice.

Prompts are processed longest first, so an out-of-memory error surfaces on the first batch rather than after
an hour, and batches hold prompts of similar length (less padding). Outputs come back in the caller's order.
Nothing is cached between calls: the search rewrites the model's weights in place between evaluations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from vlmerge.errors import VlmergeError
from vlmerge.eval.loading import ModelBundle


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode: greedy unless `do_sample`; beams, repetition penalty and stop strings as in the task."""

    max_new_tokens: int = 64
    num_beams: int = 1
    repetition_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0  # seeds sampling; greedy and beam search do not use it
    stop: tuple[str, ...] = ()
    batch_size: int = 8

    def __post_init__(self):
        for key in ("max_new_tokens", "num_beams", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise VlmergeError(f"generation setting {key} must be a positive integer, got {value!r}")
        for key in ("repetition_penalty", "temperature", "top_p"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise VlmergeError(f"generation setting {key} must be a positive number, got {value!r}")
        if self.top_p > 1:
            raise VlmergeError(f"generation setting top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise VlmergeError(
                f"generation setting stop must be a list of non-empty strings, got {self.stop!r}"
            )

    def to_dict(self) -> dict:
        return {**asdict(self), "stop": list(self.stop)}

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `model.generate` (they override the model's own generation_config)."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
            "repetition_penalty": float(self.repetition_penalty),
            "do_sample": self.do_sample,
        }
        if self.do_sample:
            kwargs.update(temperature=float(self.temperature), top_p=float(self.top_p), top_k=None)
        else:  # a checkpoint's sampling defaults must not leak into greedy or beam search
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


class StopOnStrings(StoppingCriteria):
    """Marks a row finished once its new text contains a stop string (the text is cut there afterwards).

    Only the last few tokens are decoded each step: a stop string of n characters spans at most 4n tokens
    (byte-fallback tokens carry a quarter of a character at worst).
    """

    def __init__(self, tokenizer, stops: Sequence[str], prompt_length: int):
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.prompt_length = prompt_length
        self.window = 4 * max(len(s) for s in self.stops) + 2

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_length :]
        tails = self.tokenizer.batch_decode(new[:, -self.window :], skip_special_tokens=True)
        done = [any(stop in tail for stop in self.stops) for tail in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the earliest stop string (the whole text when none occurs)."""
    positions = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return text[: min(positions)] if positions else text


def is_out_of_memory(error: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(error, oom_type) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


def _oom_error(size: int, settings: GenerationSettings) -> VlmergeError:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    shape = f"max_new_tokens={settings.max_new_tokens}, num_beams={settings.num_beams}"
    if size > 1:
        return VlmergeError(
            f"out of memory generating a batch of {size} prompts ({shape}); "
            f"try batch_size={max(1, size // 2)} "
            f"(on the command line: task.batch_size={max(1, size // 2)})"
        )
    return VlmergeError(
        f"out of memory generating a single prompt ({shape}); lower max_new_tokens or num_beams, load the "
        "model in float16/bfloat16, or use a device with more memory"
    )


def _images(batch: Sequence[Any]) -> list[Image.Image] | None:
    """PIL images for a batch (ImageRefs decoded now, lazily); None when the batch has no images."""
    present = [image is not None for image in batch]
    if not any(present):
        return None
    if not all(present):
        raise VlmergeError(
            "a batch mixes prompts with and without images; give every prompt an image or none"
        )
    return [image if isinstance(image, Image.Image) else image.load() for image in batch]


def generate(
    bundle: ModelBundle,
    prompts: Sequence[str],
    images: Sequence[Any] | None = None,
    settings: GenerationSettings = GenerationSettings(),
    *,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """The decoded continuation of every prompt (special tokens dropped, nothing stripped), in prompt order.

    `images[i]` is a PIL image, anything with `.load() -> PIL image` (an `ImageRef`, decoded only when its
    batch runs), or None; prompts must already hold the model's image token where an image goes.
    """
    prompts = list(prompts)
    images = [None] * len(prompts) if images is None else list(images)
    if len(images) != len(prompts):
        raise VlmergeError(f"generate: {len(prompts)} prompts but {len(images)} images")
    if any(image is not None for image in images) and not bundle.is_vlm:
        raise VlmergeError(
            f"model {bundle.ref.path} is a text-only {bundle.family} model; it cannot take images"
        )
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # stable: ties keep prompt order
    outputs: list[str] = [""] * len(prompts)
    kwargs = settings.generate_kwargs()
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="item", leave=False)
    try:
        with torch.random.fork_rng(devices=_rng_devices(bundle)):
            torch.manual_seed(settings.seed)
            for start in range(0, len(order), settings.batch_size):
                chunk = order[start : start + settings.batch_size]
                texts = _guarded_batch(
                    bundle, [prompts[i] for i in chunk], _images([images[i] for i in chunk]), settings, kwargs
                )
                for i, text in zip(chunk, texts):
                    outputs[i] = text
                bar.update(len(chunk))
    finally:
        bar.close()
    return outputs


def _rng_devices(bundle: ModelBundle) -> list:
    device = bundle.device
    return [device] if device.type == "cuda" else []


def _guarded_batch(
    bundle: ModelBundle, prompts: list[str], images, settings: GenerationSettings, kwargs: dict
):
    """One batch; out-of-memory (moving inputs or generating) becomes advice on the batch size.

    The advice is raised after the except block, once the failed batch's tensors are unreachable, so that
    the cache can actually be emptied.
    """
    try:
        return _generate_batch(bundle, prompts, images, settings, kwargs)
    except RuntimeError as error:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(error):
            raise
    raise _oom_error(len(prompts), settings)


@torch.no_grad()
def _generate_batch(
    bundle: ModelBundle,
    prompts: list[str],
    images: list[Image.Image] | None,
    settings: GenerationSettings,
    kwargs: dict,
) -> list[str]:
    inputs = bundle.encode(prompts, images)
    prompt_length = int(inputs["input_ids"].shape[1])
    stopping = (
        StoppingCriteriaList([StopOnStrings(bundle.tokenizer, settings.stop, prompt_length)])
        if settings.stop
        else None
    )
    out = bundle.model.generate(
        **inputs, **kwargs, pad_token_id=bundle.pad_token_id, stopping_criteria=stopping
    )
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    new_tokens = bundle.new_tokens(sequences, prompt_length)
    return bundle.tokenizer.batch_decode(
        new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
