"""Composite VLM: an OpenCLIP vision tower + a projector + an ordinary causal LM, LLaVA-style.

The language tower is stored as a plain causal-LM folder, so the merge core treats it exactly like a
standalone LLM (its tower spec only points at `language_model/`). On disk:

    model_dir/
      vlmerge_composite.json      {"format": "vlmerge-composite", "version": 1,
                                   "vision": {OpenCLIP CLIPVisionCfg fields: image_size, patch_size, width,
                                              layers, heads (or head_width), mlp_ratio, ...; plus embed_dim,
                                              quick_gelu},
                                   "projector": {"type": "mlp2x_gelu" | "linear", "in_features",
                                                 "out_features"},
                                   "image_token": "<image>", "image_token_id": int,
                                   "image_mean": [3 floats], "image_std": [3 floats],
                                   "vision_feature": "patch_tokens" | "penultimate_patch_tokens"}
      vision_encoder.safetensors  the OpenCLIP VisionTransformer's state dict (`conv1.weight`, ...)
      projector.safetensors       the projector's state dict (`0.weight`, `0.bias`[, `2.weight`, `2.bias`])
      language_model/             config.json, model.safetensors (or shards + index), generation_config.json,
                                  tokenizer files holding the `<image>` special token (its embedding row too)

`patch_tokens` are the final-layer patch tokens after `ln_post` (no class token); `penultimate_patch_tokens`
are the patch tokens leaving the second-to-last block, LLaVA's `vision_feature_layer=-2`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from open_clip.utils import to_2tuple
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from vlmerge.errors import VlmergeError

MARKER = "vlmerge_composite.json"
VISION_FILE = "vision_encoder.safetensors"
PROJECTOR_FILE = "projector.safetensors"
LANGUAGE_DIR = "language_model"
FORMAT = "vlmerge-composite"
VERSION = 1
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROJECTOR_TYPES = ("mlp2x_gelu", "linear")
VISION_FEATURES = ("patch_tokens", "penultimate_patch_tokens")
_EXTRA_VISION_KEYS = {"heads", "embed_dim", "quick_gelu"}


@dataclass(frozen=True)
class CompositeConfig:
    """Everything in `vlmerge_composite.json` except the format header."""

    vision: dict
    projector: dict
    image_token_id: int
    image_token: str = "<image>"
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    vision_feature: str = "patch_tokens"

    def __post_init__(self):
        if self.projector.get("type") not in PROJECTOR_TYPES:
            raise VlmergeError(f"projector.type must be one of {PROJECTOR_TYPES}, got "
                               f"{self.projector.get('type')!r}")
        if self.vision_feature not in VISION_FEATURES:
            raise VlmergeError(f"vision_feature must be one of {VISION_FEATURES}, got "
                               f"{self.vision_feature!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise VlmergeError("image_mean and image_std need 3 values (RGB)")

    def to_json(self) -> dict:
        data = {"format": FORMAT, "version": VERSION, **asdict(self)}
        data["image_mean"], data["image_std"] = list(self.image_mean), list(self.image_std)
        return data

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(int(v) for v in to_2tuple(self.vision.get("image_size", CLIPVisionCfg.image_size)))

    @property
    def num_image_tokens(self) -> int:
        patch = to_2tuple(self.vision.get("patch_size", CLIPVisionCfg.patch_size))
        (height, width) = self.image_size
        return (height // int(patch[0])) * (width // int(patch[1]))


def is_composite_dir(path: Path | str) -> bool:
    return (Path(path) / MARKER).is_file()


def read_config(model_dir: Path | str) -> CompositeConfig:
    """Parse and check `vlmerge_composite.json`; every problem names the file."""
    path = Path(model_dir) / MARKER
    if not path.is_file():
        raise VlmergeError(f"missing {path} (not a vlmerge composite VLM folder)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VlmergeError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise VlmergeError(f"{path}: expected \"format\": \"{FORMAT}\" and \"version\": {VERSION}")
    missing = [key for key in ("vision", "projector", "image_token_id") if key not in data]
    unknown = sorted(set(data) - set(CompositeConfig.__dataclass_fields__) - {"format", "version"})
    if missing or unknown:
        raise VlmergeError(f"{path}: missing key(s) {missing}, unknown key(s) {unknown}")
    kwargs = {key: value for key, value in data.items() if key not in ("format", "version")}
    for key in ("image_mean", "image_std"):
        if key in kwargs:
            kwargs[key] = tuple(float(v) for v in kwargs[key])
    try:
        return CompositeConfig(**kwargs)
    except VlmergeError as err:
        raise VlmergeError(f"{path}: {err}") from None


def build_vision_encoder(vision: dict, vision_feature: str = "patch_tokens") -> nn.Module:
    """An OpenCLIP VisionTransformer returning (pooled, patch tokens), via open_clip's own builder."""
    cfg = dict(vision)
    unknown = set(cfg) - set(CLIPVisionCfg.__dataclass_fields__) - _EXTRA_VISION_KEYS
    if unknown:
        raise VlmergeError(f"vision config: unknown key(s) {sorted(unknown)} (see OpenCLIP CLIPVisionCfg)")
    embed_dim = int(cfg.pop("embed_dim", cfg.get("width", CLIPVisionCfg.width)))
    quick_gelu = bool(cfg.pop("quick_gelu", False))
    if "heads" in cfg:
        heads = int(cfg.pop("heads"))
        width = int(cfg.get("width", CLIPVisionCfg.width))
        if width % heads:
            raise VlmergeError(f"vision config: width {width} is not divisible by heads {heads}")
        cfg["head_width"] = width // heads
    if cfg.get("timm_model_name") or cfg.get("attentional_pool") or isinstance(cfg.get("layers"), list):
        raise VlmergeError("vision config: only OpenCLIP ViTs without attentional pooling are supported")
    if cfg.get("pool_type", "tok") not in ("tok", "avg"):
        raise VlmergeError(f"vision config: pool_type must be 'tok' or 'avg', got {cfg['pool_type']!r}")
    if vision_feature == "penultimate_patch_tokens" and int(cfg.get("layers", CLIPVisionCfg.layers)) < 2:
        raise VlmergeError("vision config: penultimate_patch_tokens needs at least 2 vision layers")
    cfg["output_tokens"] = True
    return _build_vision_tower(embed_dim, CLIPVisionCfg(**cfg), quick_gelu=quick_gelu)


def build_projector(projector: dict) -> nn.Sequential:
    """`mlp2x_gelu` is LLaVA-1.5's projector (Linear, GELU, Linear); `linear` is LLaVA-1's."""
    in_features, out_features = int(projector["in_features"]), int(projector["out_features"])
    if projector["type"] == "linear":
        return nn.Sequential(nn.Linear(in_features, out_features))
    hidden = nn.Linear(out_features, out_features)
    return nn.Sequential(nn.Linear(in_features, out_features), nn.GELU(), hidden)


class CompositeVLM(nn.Module):
    """Vision encoder -> projector -> image-token embeddings of a causal LM."""

    def __init__(self, config: CompositeConfig, language_model: nn.Module):
        super().__init__()
        self.config = config
        self.vision_encoder = build_vision_encoder(config.vision, config.vision_feature)
        self.projector = build_projector(config.projector)
        self.language_model = language_model
        width = self.vision_encoder.conv1.out_channels
        hidden = language_model.get_input_embeddings().embedding_dim
        got = (int(config.projector["in_features"]), int(config.projector["out_features"]))
        if got != (width, hidden):
            raise VlmergeError(f"projector in/out features {got} do not match (vision width, LM hidden size) "
                               f"{(width, hidden)}")
        rows = language_model.get_input_embeddings().num_embeddings
        if not 0 <= config.image_token_id < rows:
            raise VlmergeError(f"image_token_id {config.image_token_id} is outside the LM embedding "
                               f"({rows} rows)")

    @classmethod
    def build(cls, vision_cfg: dict, projector_cfg: dict, language_model: nn.Module, image_token_id: int,
              *, seed: int | None = None, **config_fields) -> CompositeVLM:
        """A fresh random vision tower and projector around `language_model` (fp32; the toy trainer's start).

        `projector_cfg` needs only `type`; its in/out features come from the towers. `config_fields` are the
        other CompositeConfig fields (image_token, image_mean, image_std, vision_feature).
        """
        width = int(vision_cfg.get("width", CLIPVisionCfg.width))
        hidden = language_model.get_input_embeddings().embedding_dim
        projector = {"in_features": width, "out_features": hidden, **projector_cfg}
        config = CompositeConfig(dict(vision_cfg), projector, int(image_token_id), **config_fields)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model = cls(config, language_model)
        return model.to(next(language_model.parameters()).device)

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, num_image_tokens, LM hidden], in the LM's embedding dtype."""
        vision_dtype = self.vision_encoder.conv1.weight.dtype
        pixels = pixel_values.to(self.vision_encoder.conv1.weight.device, vision_dtype)
        if self.config.vision_feature == "penultimate_patch_tokens":
            out = self.vision_encoder.forward_intermediates(
                pixels, indices=[-2], stop_early=True, intermediates_only=True, output_fmt="NLC"
            )
            tokens = out["image_intermediates"][0]
        else:
            _, tokens = self.vision_encoder(pixels)
        features = self.projector(tokens.to(self.projector[0].weight.dtype))
        return features.to(self.language_model.get_input_embeddings().weight.dtype)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the image-token positions replaced by the image features, in order."""
        embedding = self.language_model.get_input_embeddings()
        input_ids = input_ids.to(embedding.weight.device)
        embeds = embedding(input_ids)
        is_image = input_ids == self.image_token_id
        per_row = is_image.sum(dim=1).tolist()
        found, images = sum(per_row), 0 if pixel_values is None else int(pixel_values.shape[0])
        wanted = images * self.num_image_tokens
        if found != wanted or any(n % self.num_image_tokens for n in per_row):
            raise VlmergeError(
                f"image tokens (id {self.image_token_id}) per row {per_row} do not match pixel_values: "
                f"{images} image(s) x {self.num_image_tokens} tokens = {wanted}, whole "
                f"images per row; let CompositeProcessor expand each {self.config.image_token}"
            )
        if images == 0:
            return embeds
        features = self.image_features(pixel_values).reshape(-1, embeds.shape[-1])
        return embeds.masked_scatter(is_image.unsqueeze(-1), features)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs):
        """The LM's output (logits, loss). Labels at image-token positions are ignored (-100)."""
        embeds = self.embed(input_ids, pixel_values)
        if labels is not None:
            is_image = input_ids.to(embeds.device) == self.image_token_id
            labels = labels.to(embeds.device).masked_fill(is_image, -100)
        if attention_mask is not None:
            attention_mask = attention_mask.to(embeds.device)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels,
                                   **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, **generate_kwargs) -> torch.Tensor:
        """Only the new token ids [B, new]. Prompts must be left-padded when batched.

        The prompt ids go to the LM too, so logits processors (repetition_penalty) see them as LLaVA's do.
        """
        embeds = self.embed(input_ids, pixel_values)
        input_ids = input_ids.to(embeds.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.language_model.generate(input_ids=input_ids, inputs_embeds=embeds,
                                           attention_mask=attention_mask.to(embeds.device), **generate_kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        return sequences[:, input_ids.shape[1]:]

    def save_pretrained(self, path: Path | str, processor=None) -> Path:
        """Write the folder atomically (temp dir, then rename); pass `processor` to include the tokenizer."""
        path = Path(path)
        if path.exists() and not (is_composite_dir(path) or (path.is_dir() and not any(path.iterdir()))):
            raise VlmergeError(f"{path} exists and is not a vlmerge composite folder; refusing to replace it")
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            text = json.dumps(self.config.to_json(), indent=2, ensure_ascii=False) + "\n"
            (tmp / MARKER).write_text(text, encoding="utf-8")
            for module, file in ((self.vision_encoder, VISION_FILE), (self.projector, PROJECTOR_FILE)):
                state = {name: t.detach().contiguous() for name, t in module.state_dict().items()}
                save_file(state, str(tmp / file))
            self.language_model.save_pretrained(tmp / LANGUAGE_DIR)
            if processor is not None:
                processor.save_pretrained(tmp)
            _replace_dir(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def from_pretrained(cls, path: Path | str, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> CompositeVLM:
        """Load a composite folder; `dtype` None keeps each part's stored dtype."""
        path = Path(path)
        config = read_config(path)
        for file in (VISION_FILE, PROJECTOR_FILE):
            if not (path / file).is_file():
                raise VlmergeError(f"missing {path / file}")
        lm_dir = path / LANGUAGE_DIR
        if not (lm_dir / "config.json").is_file():
            raise VlmergeError(f"missing {lm_dir / 'config.json'} (the language tower of {path})")
        language_model = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=dtype or "auto")
        try:
            with torch.device("meta"):  # the stored weights replace the random init: skip it
                model = cls(config, language_model)
        except VlmergeError as err:
            raise VlmergeError(f"{path / MARKER}: {err}") from None
        _load_into(model.vision_encoder.to_empty(device="cpu"), path / VISION_FILE, dtype)
        _load_into(model.projector.to_empty(device="cpu"), path / PROJECTOR_FILE, dtype)
        return model.to(device) if device is not None else model


def _replace_dir(new: Path, target: Path) -> None:
    """Swap `new` in for `target` so a reader sees the old folder or the new one, never a mix."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _load_into(module: nn.Module, file: Path, dtype: torch.dtype | None) -> None:
    """Strict load with one message naming the file and the first offending tensor."""
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise VlmergeError(f"{file}: unreadable safetensors file ({err})") from None
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise VlmergeError(f"{file}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise VlmergeError(f"{file}: tensor {name} has shape {tuple(tensor.shape)}, the config needs "
                               f"{tuple(expected[name].shape)}")
    stored = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    module.to(dtype or stored)
    module.load_state_dict(state, strict=True)
