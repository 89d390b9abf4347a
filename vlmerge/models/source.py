"""A model named in a config: a local folder or a hub id, with the dtype and device to load it in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vlmerge.errors import VlmergeError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip
# files a merge or an evaluation needs from a hub snapshot (never pickles, never code)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "language_model/*"]


def to_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise VlmergeError(f"unknown dtype {name!r}; use one of {sorted(set(DTYPES))}")
    return DTYPES[name]


@dataclass(frozen=True)
class ModelRef:
    """Where a model is (`path`: local folder or hub id) and how to load it."""

    path: str
    revision: str | None = None
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self):
        to_dtype(self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return to_dtype(self.dtype)

    def resolve(self) -> Path:
        """The local folder of this model, fetched from the hub when `path` is a hub id."""
        local = Path(self.path).expanduser()
        if local.exists():
            if not local.is_dir():
                raise VlmergeError(f"model path is a file, not a folder: {local}")
            return local
        if _looks_local(self.path):
            raise VlmergeError(f"model dir not found: {self.path}")
        return _snapshot(self.path, self.revision)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or path.count("/") != 1


def _snapshot(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # offline, unknown repo, gated, ...
        raise VlmergeError(
            f"model {repo_id!r} is not a local folder and could not be fetched from the hub "
            f"({type(err).__name__}: {err}). Download it first and pass its folder."
        ) from None


def as_ref(value: ModelRef | str | dict) -> ModelRef:
    """Accept a bare path/hub id or a mapping as well as a ModelRef (configs and recipe files use all three)."""
    if isinstance(value, ModelRef):
        return value
    if isinstance(value, str):
        return ModelRef(path=value)
    unknown = set(value) - set(ModelRef.__dataclass_fields__)
    if unknown:
        raise VlmergeError(f"unknown model key(s) {sorted(unknown)}; known: {list(ModelRef.__dataclass_fields__)}")
    return ModelRef(**{k: v for k, v in dict(value).items() if k != "_target_"})
