"""Write a merged model: the target's whole model with the merged tower, loadable by transformers.

Everything that is not tower (vision encoder, projector, tokenizer, processor, chat template, generation
config) is copied from the target as it is. Weights are written tensor by tensor into sharded safetensors with
an index, holding at most one shard in memory, inside a temporary folder renamed at the end: an error or an
interruption leaves nothing at `output_dir`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlmerge import __version__
from vlmerge.errors import VlmergeError
from vlmerge.models.pool import Pool
from vlmerge.models.source import DTYPES
from vlmerge.user_input import blocking_file

WEIGHT_SUFFIXES = (".safetensors", ".bin")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def parse_size(size: int | str) -> int:
    """Bytes from 2GB, 500MB, 10KB, 123B or a plain number; refuses anything else, and sizes below 1 byte."""
    text = str(size).strip().upper()
    unit = next((u for u in ("GB", "MB", "KB", "B") if text.endswith(u)), "")
    try:
        value = int(float(text[: len(text) - len(unit)]) * {"GB": 10**9, "MB": 10**6, "KB": 10**3}.get(unit, 1))
    except ValueError:
        value = 0
    if value < 1:
        raise VlmergeError(f"max_shard_size = {size!r}: give a positive size such as 2GB, 500MB or 1000000")
    return value


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse, before anything is written, an output path that is (or lies under) something other than a
    folder, whatever `overwrite` says, and an existing non-empty folder unless `overwrite`."""
    blocking = blocking_file(output_dir)
    if blocking is not None:
        where = "" if blocking == output_dir else f" cannot be created: {blocking}"
        raise VlmergeError(f"output dir {output_dir}{where} exists and is not a directory; choose another path")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise VlmergeError(f"output dir {output_dir} exists and is not empty; pass overwrite=true to replace it")


def check_not_inputs(output_dir: Path, inputs: dict[str, Path]) -> None:
    """Refuse an output folder that is, contains or lies inside one of the `inputs` ({role: model folder})."""
    out = output_dir.resolve()
    for role, folder in inputs.items():
        src = Path(folder).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise VlmergeError(f"output dir {output_dir} ({out}) overlaps the {role} model folder {src}; "
                               "choose an output_dir outside the input models")


@contextmanager
def staged_dir(output_dir: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside `output_dir`, renamed to it when the block ends without error, else removed.

    An existing non-empty `output_dir` is refused unless `overwrite` (then replaced only at the very end).
    """
    check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        if output_dir.exists():
            trash = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}"
            output_dir.rename(trash)
            if trash.is_symlink():
                trash.unlink()  # a link is replaced; the folder it points to stays
            else:
                shutil.rmtree(trash)
        tmp.rename(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model(
    pool: Pool,
    output_dir: Path | str,
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]],
    *,
    card: str,
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
    out_dtype: torch.dtype | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write the target model of `pool` with the tower tensors that `tensors()` yields replacing its own."""
    output_dir = Path(output_dir)
    donors = {f"donor {name}": tower.folder for name, tower in pool.donors.items()}
    check_not_inputs(output_dir, {"target": pool.target.folder, **donors, "base": pool.base.folder})
    with staged_dir(output_dir, overwrite) as tmp:
        _copy_non_weights(pool.target.folder, tmp, pool.target.spec.subdir)
        _write_weights(pool, tmp / pool.target.spec.subdir, tensors(), parse_size(max_shard_size), out_dtype)
        (tmp / "README.md").write_text(card)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return output_dir


def _copy_non_weights(src: Path, dst: Path, tower_subdir: str) -> None:
    """Copy the model folder, leaving out the tower checkpoint's weight files (rewritten) and the card."""
    tower_dir = (src / tower_subdir).resolve()

    def ignore(folder: str, names: list[str]) -> list[str]:
        here = Path(folder).resolve()
        skipped = {".git", ".cache"}
        if here == src.resolve():
            skipped.add("README.md")
        if here == tower_dir:
            skipped.update(n for n in names if n.endswith(WEIGHT_SUFFIXES) or n in INDEX_NAMES)
        return [n for n in names if n in skipped]

    shutil.copytree(src, dst, ignore=ignore, dirs_exist_ok=True)


def _write_weights(pool: Pool, folder: Path, merged: Iterator[tuple[str, torch.Tensor]], max_shard: int,
                   out_dtype: torch.dtype | None) -> None:  # fmt: skip
    checkpoint = pool.target.checkpoint
    merged_keys = {p.target_key for p in pool.plan.tensors}
    names = checkpoint.names

    def size(name: str) -> int:
        stored = checkpoint.dtype(name).itemsize
        written = out_dtype.itemsize if out_dtype is not None and name in merged_keys else stored
        return checkpoint.nbytes(name) // stored * written

    shards: list[list[str]] = [[]]
    filled = 0
    for name in names:
        if shards[-1] and filled + size(name) > max_shard:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size(name)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        batch = {}
        for name in shard:
            tensor = _next_merged(merged, name) if name in merged_keys else checkpoint.get(name)
            batch[name] = tensor.contiguous()
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
        save_file(batch, str(folder / file), metadata={"format": "pt"})
        del batch
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _next_merged(merged: Iterator[tuple[str, torch.Tensor]], name: str) -> torch.Tensor:
    """Merged tensors arrive in checkpoint order (the plan follows it), so at most one shard is held."""
    key, tensor = next(merged)
    if key != name:
        raise RuntimeError(f"merged tensors out of order: got {key}, expected {name}")
    return tensor


def model_card(pool: Pool, recipe_yaml: str, summary: str) -> str:
    def line(role: str, tower) -> str:
        rev = f" @ {tower.ref.revision}" if tower.ref.revision else ""
        return f"- **{role}**: `{tower.ref.path}`{rev} ({tower.spec.family})"

    sources = [line("target", pool.target), *(line(f"donor `{n}`", t) for n, t in pool.donors.items())]
    if pool.base is not pool.target:
        sources.append(line("base (task vectors)", pool.base))
    kept = "vision encoder and projector copied unchanged from the target; " if pool.target.spec.is_vlm else ""
    return (
        f"---\nlibrary_name: transformers\ntags: [vlmerge, merge]\n---\n# Merged with vlmerge {__version__}\n\n"
        f"Language tower merged inside the target ({kept}tokenizer and configs from the target).\n\n"
        "## Sources\n" + "\n".join(sources) + f"\n\n## Coverage\n```\n{summary}\n```\n\n"
        f"## Recipe\n```yaml\n{recipe_yaml}```\n"
    )


def out_dtype_of(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise VlmergeError(f"unknown out_dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]
