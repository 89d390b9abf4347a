"""A model ready for generation: the model, what turns (text, images) into its inputs, and its tokenizer.

One `ModelBundle` per family (LLaVA, LLaVA-NeXT, the composite VLM, causal LMs) hides how each is loaded,
encoded (always LEFT-padded, the layout batched generation needs) and decoded. The bundle holds the model
itself and nothing computed from its weights, so a resident model whose tower is rewritten in place between
evaluations can be evaluated again through the same bundle.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from vlmerge.errors import VlmergeError
from vlmerge.models.checkpoint import Checkpoint
from vlmerge.models.source import ModelRef, as_ref
from vlmerge.models.towers import TowerSpec, detect_family

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"  # where a task's prompt puts the image; replaced by the model's own token
HF_VLM_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}


@dataclass(frozen=True)
class ModelBundle:
    """A loaded model with its processor (the tokenizer itself for a causal LM) and tokenizer."""

    model: Any
    processor: Any
    tokenizer: Any
    family: str  # llava | llava_next | composite | causal_lm
    ref: ModelRef

    @property
    def is_vlm(self) -> bool:
        return self.family != "causal_lm"

    @property
    def image_token(self) -> str | None:
        """The text the processor expands into image features (None for a text-only model)."""
        if not self.is_vlm:
            return None
        return getattr(self.processor, "image_token", None) or IMAGE_PLACEHOLDER

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_token_id(self) -> int | None:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def encode(self, prompts: list[str], images: list | None) -> dict[str, torch.Tensor]:
        """Left-padded model inputs on the model's device; pixel values in the vision tower's dtype."""
        if self.family == "causal_lm":
            batch = self.processor(prompts, padding=True, return_tensors="pt")
        else:
            batch = self.processor(text=prompts, images=images or None, padding=True, return_tensors="pt")
        device = self.device
        floating = None if self.family == "composite" else self.model.dtype  # the composite casts itself
        out = {}
        for key, value in dict(batch).items():
            if not isinstance(value, torch.Tensor):
                continue
            if floating is not None and value.is_floating_point():
                value = value.to(floating)
            out[key] = value.to(device)
        if self.family == "causal_lm":
            out.pop("token_type_ids", None)
        return out

    def new_tokens(self, sequences: torch.Tensor, prompt_length: int) -> torch.Tensor:
        """The generated part of `generate`'s output (the composite already returns only that)."""
        return sequences if self.family == "composite" else sequences[:, prompt_length:]

    def chat_prompt(self, user_text: str, *, system: str | None, has_image: bool) -> str:
        """The model's chat template around one user turn, ending where the assistant's answer starts.

        LLaVA processors take structured content (the template places the image); the composite and causal
        LMs take text, with the image token where the task's prompt put `<image>` (or first). A template
        that refuses a system turn gets the system prompt as the first paragraph of the user turn.
        """
        structured = self.family in HF_VLM_CLASSES
        renderer = self.processor if structured else self.tokenizer
        if not getattr(renderer, "chat_template", None):
            raise VlmergeError(
                f"model {self.ref.path} has no chat template; set the task's chat_template=false and "
                "write the prompt format in `prompt`"
            )
        if structured:
            user_text = user_text.replace(IMAGE_PLACEHOLDER, "").strip()

        def content(text: str, image: bool) -> Any:
            if not structured:
                return text
            return ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]

        turns = [{"role": "user", "content": content(user_text, has_image)}]
        if system:
            turns.insert(0, {"role": "system", "content": content(system, False)})
        try:
            rendered = renderer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # noqa: BLE001 -- jinja raises TemplateError for an unsupported system role
            if not system:
                raise VlmergeError(f"model {self.ref.path}: its chat template failed: {error}") from None
            log.info(
                "chat template of %s takes no system turn: system prompt put in the user turn", self.ref.path
            )
            merged = [{"role": "user", "content": content(f"{system}\n\n{user_text}", has_image)}]
            try:
                rendered = renderer.apply_chat_template(merged, add_generation_prompt=True, tokenize=False)
            except Exception as again:  # noqa: BLE001
                raise VlmergeError(f"model {self.ref.path}: its chat template failed: {again}") from None
        return self._drop_duplicate_bos(rendered)

    def _drop_duplicate_bos(self, rendered: str) -> str:
        """Templates write the BOS token as text; tokenizing adds it again, so drop the written one."""
        bos = self.tokenizer.bos_token
        if bos and rendered.startswith(bos) and _adds_bos(self.tokenizer):
            return rendered[len(bos) :]
        return rendered


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def load_model(
    ref: ModelRef | str | Mapping,
    *,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> ModelBundle:
    """Load a model folder or hub id for generation, in `ref.dtype` on `ref.device`, in eval mode."""
    ref = as_ref(ref)
    check_device(ref.device)
    folder = ref.resolve()
    spec = detect_family(folder)
    try:
        model = _load_weights(folder, spec, ref, trust_remote_code)
    except SafetensorError as error:
        raise _corrupt_safetensors(folder, error) from None
    except (OSError, ValueError, KeyError) as error:
        raise VlmergeError(f"cannot load the {spec.family} model in {folder}: {error}") from None
    if attn_implementation is not None:
        target = getattr(model, spec.subdir) if spec.subdir else model  # the module holding the LM
        target.set_attn_implementation(attn_implementation)
    model = model.to(ref.device).eval()
    return bundle_for(model, ref, family=spec.family, trust_remote_code=trust_remote_code)


def bundle_for(
    model: Any, ref: ModelRef | str | Mapping, *, family: str | None = None, trust_remote_code: bool = False
) -> ModelBundle:
    """A bundle around an already loaded model (the search's resident target): loads only the processor."""
    ref = as_ref(ref)
    folder = ref.resolve()
    family = family or detect_family(folder).family
    processor, tokenizer = load_processor(folder, family, trust_remote_code=trust_remote_code)
    return ModelBundle(model=model, processor=processor, tokenizer=tokenizer, family=family, ref=ref)


def load_processor(folder: Path, family: str, *, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(processor, tokenizer) of a model folder, the tokenizer set to pad on the left."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        if family == "composite":
            from vlmerge.models.composite_processor import CompositeProcessor

            processor = CompositeProcessor.from_pretrained(folder)
            tokenizer = processor.tokenizer
        elif family in HF_VLM_CLASSES:
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
            tokenizer = getattr(processor, "tokenizer", None)
            if tokenizer is None:
                raise VlmergeError(f"{folder}: the processor has no tokenizer ({type(processor).__name__})")
        else:
            processor = tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise VlmergeError(f"cannot load the tokenizer/processor of {folder}: {error}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # in memory only: batching needs a pad id
    return processor, tokenizer


def _load_weights(folder: Path, spec: TowerSpec, ref: ModelRef, trust_remote_code: bool):
    """The family's model class (tower spec `model_class`: a transformers name or a dotted vlmerge path)."""
    if "." in spec.model_class:
        from hydra.utils import get_class

        return get_class(spec.model_class).from_pretrained(folder, dtype=ref.torch_dtype)
    import transformers

    cls = getattr(transformers, spec.model_class)
    return cls.from_pretrained(folder, dtype=ref.torch_dtype, trust_remote_code=trust_remote_code)


def _corrupt_safetensors(folder: Path, error: Exception) -> VlmergeError:
    """The merge side's message naming the bad file (a Checkpoint opens every header), else one naming the folder."""
    for sub in sorted({file.parent for file in folder.rglob("*.safetensors")}):
        try:
            Checkpoint(sub)
        except VlmergeError as found:
            return found
    return VlmergeError(f"corrupt or truncated safetensors file in {folder}: {error}")


def check_device(device: str) -> None:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise VlmergeError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise VlmergeError(f"device {device!r} was asked for but no CUDA device is available; use device=cpu")
