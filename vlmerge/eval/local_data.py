"""Loaders of local files: VQA and math JSONL (one file per split) and MGSM's TSV."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from vlmerge.errors import VlmergeError
from vlmerge.eval.data import (
    JSONL_DEFAULT_ROLES,
    ROLES,
    DataNotFound,
    Dataset,
    ImageRef,
    Item,
    declare_roles,
    finish_split,
)
from vlmerge.user_input import utf8_lines


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for every non-blank line."""
    for lineno, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise VlmergeError(f"{path}:{lineno}: invalid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise VlmergeError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def _field(row: dict, key: str, where: str, kinds: tuple[type, ...] = (str,)) -> Any:
    if row.get(key) is None:
        raise VlmergeError(f"{where}: missing field {key!r}")
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, kinds):
        names = " or ".join(kind.__name__ for kind in kinds)
        raise VlmergeError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def vqa_item(row: dict, where: str, folder: Path) -> Item:
    item_id = str(_field(row, "id", where, (str, int)))
    answers = _field(row, "answers", where, (list,))
    if not answers or not all(isinstance(answer, str) for answer in answers):
        raise VlmergeError(f"{where}: field 'answers' must be a non-empty list of strings")
    image = ImageRef.confined(folder, _field(row, "image", where), item_id)
    extra = {key: value for key, value in row.items() if key not in {"id", "image", "question", "answers"}}
    return Item(item_id, _field(row, "question", where), tuple(answers), image, extra)


def math_item(row: dict, where: str, folder: Path) -> Item:
    item_id = str(_field(row, "id", where, (str, int)))
    answer = str(_field(row, "answer", where, (str, int, float)))
    extra = {key: value for key, value in row.items() if key not in {"id", "question", "answer"}}
    return Item(item_id, _field(row, "question", where), (answer,), None, extra)


def _jsonl_split(path: Path, split: str, make_item: Callable, limit: int | None) -> list[Item]:
    items = [make_item(row, f"{path}:{lineno}", path.parent) for lineno, row in _read_jsonl(path)]
    return finish_split(items, split, str(path), limit)


def _dataset_config(folder: Path) -> dict:
    """Optional dataset.yaml/.yml/.json beside the split files: name, search_split, heldout_split."""
    for path in (folder / "dataset.yaml", folder / "dataset.yml", folder / "dataset.json"):
        if path.is_file():
            try:
                config = yaml.safe_load("".join(line for _, line in utf8_lines(path))) or {}
            except yaml.YAMLError as error:
                raise VlmergeError(f"{path}: cannot parse ({error})") from None
            if not isinstance(config, dict) or set(config) - {"name", "search_split", "heldout_split"}:
                raise VlmergeError(f"{path}: keys may be name, search_split, heldout_split; got {config!r}")
            return config
    return {}


def load_jsonl(make_item: Callable, data: str, splits: Mapping | None, limit: int | None) -> Dataset:
    path = Path(data)
    if path.is_file():
        names = {split for split in (splits or {}).values() if split is not None}
        if len(names) > 1:
            raise VlmergeError(f"{path} is one file, so one split; got several split names {sorted(names)}")
        split = names.pop() if names else path.stem
        files, config = {split: path}, {}
    elif path.is_dir():
        files = {file.stem: file for file in sorted(path.glob("*.jsonl"))}
        if not files:
            raise DataNotFound(f"dataset folder {path} has no <split>.jsonl files")
        config = _dataset_config(path)
    else:
        raise DataNotFound(f"dataset not found: {path} (a .jsonl file or a folder of <split>.jsonl files)")
    declared = {role: config[f"{role}_split"] for role in ROLES if f"{role}_split" in config}
    roles = declare_roles(str(path), files, JSONL_DEFAULT_ROLES, {**declared, **(splits or {})})
    loaded = {split: _jsonl_split(file, split, make_item, limit) for split, file in files.items()}
    name = config.get("name") or (path.stem if path.is_file() else path.name)
    return Dataset(name, loaded, roles["search"], roles["heldout"], source=str(path))


def load_mgsm_tsv(data: str, *, splits=None, limit=None) -> Dataset:
    """MGSM's `question<TAB>answer` file (no header): one held-out split "test"; MGSM has no search split.

    Gold answers stay as written ("5,600"): reading them as numbers is the math metric's job.
    """
    path = Path(data)
    if not path.is_file():
        raise DataNotFound(f"MGSM file not found: {path} (a question<TAB>answer .tsv file)")
    items = []
    for lineno, line in utf8_lines(path):
        line = line.rstrip("\r\n")
        question, tab, answer = line.rpartition("\t")
        if not tab or not question.strip() or not answer.strip():
            raise VlmergeError(f"{path}:{lineno}: expected 'question<TAB>answer', got {line[:60]!r}")
        items.append(Item(str(lineno - 1), question, (answer.strip(),)))
    roles = declare_roles(path.stem, ["test"], {"search": None, "heldout": "test"}, splits)
    test = finish_split(items, "test", str(path), limit)
    return Dataset(path.stem, {"test": test}, roles["search"], roles["heldout"], source=str(path))
