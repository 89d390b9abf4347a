"""Processor of a composite VLM: the language tower's tokenizer + the OpenCLIP image transform.

Each `<image>` in a prompt becomes `num_image_tokens` image-token ids (as transformers' LLaVA processor does),
so the model can swap those embeddings for the image features one for one. Batches are LEFT-padded by
default, the layout batched generation needs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms
from transformers import AutoTokenizer, BatchFeature

from vlmerge.errors import VlmergeError
from vlmerge.models.composite import (
    LANGUAGE_DIR,
    MARKER,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CompositeConfig,
    read_config,
)


class CompositeProcessor:
    """Text + images -> input_ids, attention_mask, pixel_values for CompositeVLM."""

    def __init__(self, tokenizer, *, image_size: tuple[int, int], num_image_tokens: int,
                 image_token: str = "<image>", image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD):
        self.tokenizer = tokenizer
        self.image_size = tuple(image_size)
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.image_token_id = _single_token_id(tokenizer, image_token)

    @property
    def transform(self) -> transforms.Compose:
        """Resize to the ViT's input size, scale to [0, 1], normalise (built from the current fields)."""
        return transforms.Compose([
            transforms.Resize(self.image_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(self.image_mean, self.image_std),
        ])

    @classmethod
    def from_config(cls, tokenizer, config: CompositeConfig) -> CompositeProcessor:
        processor = cls(tokenizer, image_size=config.image_size, num_image_tokens=config.num_image_tokens,
                        image_token=config.image_token, image_mean=config.image_mean,
                        image_std=config.image_std)
        if processor.image_token_id != config.image_token_id:
            raise VlmergeError(f"tokenizer maps {config.image_token} to id {processor.image_token_id}, the "
                               f"model expects {config.image_token_id}")
        return processor

    @classmethod
    def from_pretrained(cls, model_dir: Path | str) -> CompositeProcessor:
        model_dir = Path(model_dir)
        config = read_config(model_dir)
        lm_dir = model_dir / LANGUAGE_DIR
        if not lm_dir.is_dir():
            raise VlmergeError(f"missing {lm_dir} (the language tower and tokenizer of {model_dir})")
        try:
            tokenizer = AutoTokenizer.from_pretrained(lm_dir)
        except (OSError, ValueError) as err:
            raise VlmergeError(f"{lm_dir}: no loadable tokenizer ({err})") from None
        return cls.from_config(tokenizer, config)

    def save_pretrained(self, model_dir: Path | str) -> None:
        """Tokenizer into `language_model/`, image fields into the existing `vlmerge_composite.json`."""
        model_dir = Path(model_dir)
        marker = model_dir / MARKER
        read_config(model_dir)  # refuses a folder that holds no composite model yet
        data = json.loads(marker.read_text(encoding="utf-8"))
        data.update(image_token=self.image_token, image_token_id=self.image_token_id,
                    image_mean=list(self.image_mean), image_std=list(self.image_std))
        lm_dir = model_dir / LANGUAGE_DIR
        lm_dir.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=model_dir) as tmp:
            self.tokenizer.save_pretrained(tmp)
            for file in Path(tmp).iterdir():
                os.replace(file, lm_dir / file.name)
            staged = Path(tmp) / MARKER
            staged.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            shutil.move(staged, marker)

    def __call__(self, text: str | list[str], images=None, padding: bool = True, return_tensors: str = "pt",
                 padding_side: str = "left") -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        images = _flatten_images(images)
        count = sum(t.count(self.image_token) for t in texts)
        if count != len(images):
            raise VlmergeError(f"the text holds {count} {self.image_token} but {len(images)} image(s) were "
                               "given")
        rows = [self._expand(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        if return_tensors != "pt":
            raise VlmergeError(f"return_tensors must be 'pt', got {return_tensors!r}")
        if len({len(r) for r in rows}) > 1 and not padding:
            raise VlmergeError("prompts of different lengths need padding=True")
        input_ids, attention_mask = self._pad(rows, padding_side)
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if images:
            transform = self.transform
            data["pixel_values"] = torch.stack([transform(img.convert("RGB")) for img in images])
        return BatchFeature(data)

    def _expand(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        for token in ids:
            out.extend([token] * self.num_image_tokens if token == self.image_token_id else [token])
        return out

    def _pad(self, rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        if side not in ("left", "right"):
            raise VlmergeError(f"padding_side must be 'left' or 'right', got {side!r}")
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id if pad_id is not None else 0, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return ids, mask

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def apply_chat_template(self, conversation, **kwargs):
        if not getattr(self.tokenizer, "chat_template", None):
            raise VlmergeError("the tokenizer has no chat template; write the prompt format into the task "
                               "config")
        return self.tokenizer.apply_chat_template(conversation, **kwargs)


def _single_token_id(tokenizer, token: str) -> int:
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise VlmergeError(f"the tokenizer has no {token} token; add it as a special token")
    encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
    if encoded != [ids[0]]:
        raise VlmergeError(f"the tokenizer splits {token} into {encoded}; add it as a special token")
    return int(ids[0])


def _flatten_images(images) -> list[Image.Image]:
    """None, one image, a flat list, or one list per prompt -> images in `<image>` order."""
    if images is None:
        return []
    if isinstance(images, Image.Image):
        return [images]
    flat = []
    for item in images:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    for item in flat:
        if not isinstance(item, Image.Image):
            raise VlmergeError(f"images must be PIL images, got {type(item).__name__}")
    return flat
