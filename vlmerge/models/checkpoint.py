"""Lazy tensor access by name across the safetensors shards of one checkpoint folder.

Nothing is loaded until a tensor is asked for, so a merge touches one tensor of each model at a time.
Pickle checkpoints (`*.bin`) can run code when loaded: they are refused unless `allow_pickle=True`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from vlmerge.errors import VlmergeError

SAFE_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


class Checkpoint:
    """The tensors of one folder (`model.safetensors`, shards + index, or opted-in pickle files)."""

    def __init__(self, folder: Path | str, *, allow_pickle: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise VlmergeError(f"model dir not found: {self.folder}")
        self._where: dict[str, Path] = {}  # tensor name -> file
        self._open: dict[Path, object] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self.files = self._find_files(allow_pickle)
        for file in self.files:
            for name in self._keys(file):
                self._where.setdefault(name, file)
        self._check_index()

    def _find_files(self, allow_pickle: bool) -> list[Path]:
        safe = sorted(self.folder.glob("*.safetensors"))
        if safe:
            return safe
        pickled = sorted(self.folder.glob("*.bin"))
        if pickled and not allow_pickle:
            raise VlmergeError(
                f"{self.folder} holds only pickle checkpoints ({pickled[0].name}); loading them can run "
                "arbitrary code. Convert them to safetensors, or pass allow_pickle=true if you trust the source."
            )
        if pickled:
            return pickled
        raise VlmergeError(f"no weights (*.safetensors) in {self.folder}")

    def _keys(self, file: Path) -> list[str]:
        if file.suffix == ".bin":
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            self._pickled[file] = state
            return list(state)
        try:
            handle = safe_open(str(file), framework="pt")
        except (SafetensorError, OSError) as err:
            raise VlmergeError(f"corrupt or truncated safetensors file {file}: {err}") from None
        self._open[file] = handle
        return list(handle.keys())

    def _check_index(self) -> None:
        index = self.folder / (SAFE_INDEX if self.files[0].suffix == ".safetensors" else PICKLE_INDEX)
        if not index.is_file():
            return
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise VlmergeError(f"{index}: not a valid index ({err})") from None
        for name, file in weight_map.items():
            if not (self.folder / file).is_file():
                raise VlmergeError(f"{index}: shard {file} (for {name}) is missing")
            if name not in self._where:
                raise VlmergeError(f"{index}: tensor {name} is not in {file}")

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        file = self._where[name]
        if file in self._pickled:
            return tuple(self._pickled[file][name].shape)
        return tuple(self._open[file].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        file = self._where[name]
        if file in self._pickled:
            return self._pickled[file][name].dtype
        return _DTYPES[self._open[file].get_slice(name).get_dtype()]

    def nbytes(self, name: str) -> int:
        numel = 1
        for dim in self.shape(name):
            numel *= dim
        return numel * self.dtype(name).itemsize

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise VlmergeError(f"tensor {name} not found in {self.folder}")
        file = self._where[name]
        if file in self._pickled:
            return self._pickled[file][name]
        try:
            return self._open[file].get_tensor(name)
        except SafetensorError as err:
            raise VlmergeError(f"cannot read tensor {name} from {file}: {err}") from None

    def metadata(self) -> dict[str, str]:
        for handle in self._open.values():
            return handle.metadata() or {}
        return {}
