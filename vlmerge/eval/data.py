"""Evaluation data: one item model for VQA and math, loaders by kind, and the search/held-out split rule.

Every dataset declares which split the search may score (fitness) and which one is held out for the final
report; `resolve_split` refuses to hand the held-out split to the search unless explicitly allowed, because
a recipe tuned on its test set reports a number that means nothing.
"""

from __future__ import annotations

import inspect
import io
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vlmerge.errors import VlmergeError

log = logging.getLogger(__name__)

ROLES = ("search", "heldout")
JSONL_DEFAULT_ROLES = {"search": "search", "heldout": "heldout"}
MAX_LISTED = 20


class DataNotFound(VlmergeError):
    """`data` is no file or folder the loader reads; a Task names the config key that set it (task.data)."""


@dataclass(frozen=True)
class ImageRef:
    """An image an item points at: a file (confined to its data folder), encoded bytes, or a PIL image.

    Nothing is decoded until `load()`: a dataset of a thousand images costs file names or bytes, not pixels.
    """

    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)
    pil: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def confined(cls, folder: Path, relative: str, item_id: str) -> ImageRef:
        """The file `relative` to `folder`; refuses absolute paths and '..' walks out of it.

        The check is on the path as written: a symlink inside the folder is its owner's choice.
        """
        root = Path(os.path.normpath(folder.absolute()))
        target = Path(os.path.normpath(root / relative))
        if Path(relative).is_absolute() or not target.is_relative_to(root):
            raise VlmergeError(
                f"item {item_id!r}: image path {relative!r} escapes the data folder {root}; "
                "image paths must be relative to the jsonl file and stay inside its folder"
            )
        return cls(path=target)

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"<{len(self.data)} bytes>" if self.data is not None else "<no image data>"

    def decode(self) -> Image.Image:
        """The RGB image; raises whatever PIL raises (see `load` for the user-facing version)."""
        if self.pil is not None:
            image = self.pil
        elif self.data is not None:
            image = Image.open(io.BytesIO(self.data))
        elif self.path is not None:
            image = Image.open(self.path)
        else:
            raise ValueError("no image data")
        image.load()
        return image.convert("RGB")

    def load(self) -> Image.Image:
        try:
            return self.decode()
        except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            raise VlmergeError(f"cannot read image {self.describe()}: {_reason(error)}") from error


@dataclass(frozen=True)
class Item:
    """One question with its references: VQA answers, or the single gold answer of a math problem."""

    id: str
    question: str
    answers: tuple[str, ...]
    image: ImageRef | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Dataset:
    """Named splits of items, and which split plays the search (fitness) and the held-out role."""

    name: str
    splits: Mapping[str, list[Item]]
    search_split: str | None
    heldout_split: str | None
    source: str = ""

    def __post_init__(self):
        for role, split in (("search", self.search_split), ("heldout", self.heldout_split)):
            if split is not None and split not in self.splits:
                raise VlmergeError(
                    f"dataset {self.name!r}: {role} split {split!r} does not exist; "
                    f"its splits are {sorted(self.splits)}"
                )

    def split(self, name: str) -> list[Item]:
        if name not in self.splits:
            raise VlmergeError(
                f"dataset {self.name!r} has no split {name!r}; its splits are {sorted(self.splits)} "
                f"(search split: {self.search_split or 'none declared'}, "
                f"held-out split: {self.heldout_split or 'none declared'})"
            )
        return self.splits[name]


def resolve_split(dataset: Dataset, role: str, *, allow_heldout_as_fitness: bool = False) -> str:
    """The split name for `role`: "heldout", "search" (the fitness role) or an explicit split name.

    Only the role "heldout" hands out the held-out split freely. "search", or an explicit name that is the
    held-out split, is refused there unless `allow_heldout_as_fitness` (then a warning is logged); under that
    permission a dataset without a search split falls back to its held-out split.
    """
    if role == "heldout":
        if dataset.heldout_split is None:
            raise VlmergeError(f"dataset {dataset.name!r} declares no held-out split; set splits.heldout")
        return dataset.heldout_split
    if role == "search":
        split = dataset.search_split
        if split is None and (not allow_heldout_as_fitness or dataset.heldout_split is None):
            raise VlmergeError(
                f"dataset {dataset.name!r} declares no search split (splits: {sorted(dataset.splits)}; "
                f"held-out: {dataset.heldout_split}); fit on another dataset or name one with splits.search"
            )
        split = split or dataset.heldout_split
    else:
        dataset.split(role)  # refuses an unknown name, listing the splits
        split = role
    if split == dataset.heldout_split:
        if not allow_heldout_as_fitness:
            raise VlmergeError(
                f"dataset {dataset.name!r}: split {split!r} is the held-out split and {role!r} asks for it "
                "outside the 'heldout' role; scoring candidates on it leaks the test set into the recipe. "
                "Report on it with role 'heldout', fit on another split, or set "
                "allow_heldout_as_fitness=true (the report is then not a held-out result)"
            )
        log.warning(
            "dataset %r: using the held-out split %r as a search (fitness) split because "
            "allow_heldout_as_fitness is set; the final report is NOT a held-out result",
            dataset.name,
            split,
        )
    return split


def check_images(items: Iterable[Item]) -> list[tuple[str, str]]:
    """(id, reason) for every item whose image cannot be opened and decoded; text items are skipped."""
    bad = []
    for item in items:
        if item.image is None:
            continue
        try:
            item.image.decode()
        except Exception as error:  # noqa: BLE001 -- any failure to decode is a reason to report, not a crash
            bad.append((item.id, _reason(error)))
    return bad


def screen_images(items: Iterable[Item], *, skip_bad_items: bool = False, what: str = "") -> frozenset[str]:
    """Ids of items with bad images: refused (one error listing them) unless `skip_bad_items`.

    With `skip_bad_items` the ids are returned (the evaluator scores them as empty predictions) and counted
    in the log.
    """
    bad = check_images(items)
    if not bad:
        return frozenset()
    where = f" in {what}" if what else ""
    if not skip_bad_items:
        listed = ", ".join(f"{item_id} ({reason})" for item_id, reason in bad[:MAX_LISTED])
        more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise VlmergeError(
            f"{len(bad)} item(s){where} have missing or undecodable images: {listed}{more}; fix the data or "
            "set skip_bad_items=true to score them as empty predictions"
        )
    log.warning(
        "%d item(s)%s have missing or undecodable images; scored as empty predictions", len(bad), where
    )
    return frozenset(item_id for item_id, _ in bad)


def _reason(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        return f"missing file {error.filename}"
    return f"{type(error).__name__}: {error}"


# ---------------------------------------------------------------- shared checks for every loader


def finish_split(items: list[Item], split: str, where: str, limit: int | None) -> list[Item]:
    """Refuse an empty split or duplicate ids (naming them), then keep the first `limit` items."""
    if not items:
        raise VlmergeError(f"split {split!r} ({where}) has no items")
    seen: dict[str, int] = {}
    duplicates = []
    for item in items:
        seen[item.id] = seen.get(item.id, 0) + 1
        if seen[item.id] == 2:
            duplicates.append(item.id)
    if duplicates:
        raise VlmergeError(
            f"split {split!r} ({where}) has duplicate item ids: {duplicates[:MAX_LISTED]}"
            + (f" and {len(duplicates) - MAX_LISTED} more" if len(duplicates) > MAX_LISTED else "")
        )
    return items if limit is None else items[:limit]


def declare_roles(
    name: str, available: Iterable[str], defaults: Mapping[str, str | None], chosen: Mapping[str, Any] | None
) -> dict[str, str | None]:
    """Role -> split: what `chosen` (config) names must exist; a default the data lacks is dropped."""
    available = set(available)
    chosen = dict(chosen or {})
    unknown = sorted(set(chosen) - set(ROLES))
    if unknown:
        raise VlmergeError(f"dataset {name!r}: unknown split role(s) {unknown}; roles are {list(ROLES)}")
    roles = {}
    for role in ROLES:
        split = chosen[role] if role in chosen else defaults.get(role)
        if split is not None and split not in available:
            if role in chosen:
                raise VlmergeError(
                    f"dataset {name!r}: {role} split {split!r} does not exist; "
                    f"its splits are {sorted(available)}"
                )
            split = None
        roles[role] = split
    return roles


# ---------------------------------------------------------------- local files (vlmerge/eval/local_data.py)


def load_vqa_jsonl(data: str, *, revision=None, splits=None, limit=None) -> Dataset:
    from vlmerge.eval import local_data

    return local_data.load_jsonl(local_data.vqa_item, data, splits, limit)


def load_math_jsonl(data: str, *, revision=None, splits=None, limit=None) -> Dataset:
    from vlmerge.eval import local_data

    return local_data.load_jsonl(local_data.math_item, data, splits, limit)


def load_mgsm_tsv(data: str, *, revision=None, splits=None, limit=None) -> Dataset:
    from vlmerge.eval import local_data

    return local_data.load_mgsm_tsv(data, splits=splits, limit=limit)


# ---------------------------------------------------------------- hub formats (`datasets` imported on use)


def load_ja_vg_vqa(data: str, *, revision=None, splits=None, limit=None, qas: str = "all") -> Dataset:
    from vlmerge.eval import hub_data

    return hub_data.load_ja_vg_vqa(data, revision=revision, splits=splits, limit=limit, qas=qas)


def load_ja_vlm_wild(data: str, *, revision=None, splits=None, limit=None) -> Dataset:
    from vlmerge.eval import hub_data

    return hub_data.load_ja_vlm_wild(data, revision=revision, splits=splits, limit=limit)


def load_gsm8k_ja(data: str, *, revision=None, splits=None, limit=None) -> Dataset:
    from vlmerge.eval import hub_data

    return hub_data.load_gsm8k_ja(data, revision=revision, splits=splits, limit=limit)


LOADERS: dict[str, Callable[..., Dataset]] = {
    "vqa_jsonl": load_vqa_jsonl,
    "math_jsonl": load_math_jsonl,
    "mgsm_tsv": load_mgsm_tsv,
    "ja_vg_vqa": load_ja_vg_vqa,  # SakanaAI/JA-VG-VQA-500
    "ja_vlm_wild": load_ja_vlm_wild,  # SakanaAI/JA-VLM-Bench-In-the-Wild
    "gsm8k_ja": load_gsm8k_ja,  # SakanaAI/gsm8k-ja-test_250-1319
}
LOCAL_KINDS = frozenset({"vqa_jsonl", "math_jsonl", "mgsm_tsv"})


def load_dataset(
    kind: str,
    data: str,
    *,
    revision: str | None = None,
    splits: Mapping[str, str | None] | None = None,
    limit: int | None = None,
    options: Mapping[str, Any] | None = None,
) -> Dataset:
    """Load `data` (file, folder or hub id) with the loader of `kind`.

    `splits` maps a role ("search", "heldout") to a split name (or None: no such role), overriding what the
    data declares; `limit` keeps the first items of every split; `options` are the loader's own keywords.
    """
    if kind not in LOADERS:
        raise VlmergeError(f"unknown dataset kind {kind!r}; known kinds: {sorted(LOADERS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise VlmergeError(f"limit must be a positive integer or null, got {limit!r}")
    if splits is not None and not isinstance(splits, Mapping):
        raise VlmergeError(f"splits must map a role (search/heldout) to a split name, got {splits!r}")
    options = dict(options or {})
    accepted = sorted(
        set(inspect.signature(LOADERS[kind]).parameters) - {"data", "revision", "splits", "limit"}
    )
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise VlmergeError(
            f"dataset kind {kind!r} has no option(s) {unknown}; its options: {accepted or 'none'}"
        )
    if revision is not None and kind in LOCAL_KINDS:
        log.warning("dataset kind %r reads local files: revision %r is ignored", kind, revision)
    return LOADERS[kind](str(data), revision=revision, splits=splits, limit=limit, **options)
