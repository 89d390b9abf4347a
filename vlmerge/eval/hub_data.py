"""Loaders of the real Japanese evaluation sets in their Hugging Face hub layout (hub id or a local copy).

Column names and splits, as read on the dataset cards (README `dataset_info`) and in SakanaAI's own
evaluation code (github.com/SakanaAI/evolutionary-model-merge, evomerge/eval/*.py):
- SakanaAI/JA-VG-VQA-500 (CC BY 4.0): rows `image_id` int, `url`, `width`, `height`, `coco_id`, `flickr_id`,
  `qas` list of {`a_objects`, `answer`, `q_objects`, `qa_id`, `question`}, `image`; splits `test` (500 rows)
  and `train` (1,000 rows, added at commit aa13b70). Each row is an image; SakanaAI's evaluator scores only
  `qas[0]` of each row (option qas="first"); the default here is one item per question.
- SakanaAI/JA-VLM-Bench-In-the-Wild (images under the Unsplash License): `page_url`, `image_url`, `image`,
  `question`, `answer`; split `test` (50 rows, 42 images).
- SakanaAI/gsm8k-ja-test_250-1319 (Apache-2.0): one jsonl file, split `test`, 1,069 rows (GSM8K test rows
  251..1319 translated with gpt-4-0125-preview; the first 250 are MGSM). The card lists no columns;
  `question` and `answer_number` are what scripts loading it read (optunahub's evo_merge example and
  others); a GSM8K-style `answer` ("... #### 42", or a bare number) serves when `answer_number` is absent.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from vlmerge.errors import VlmergeError
from vlmerge.eval.data import DataNotFound, Dataset, ImageRef, Item, declare_roles, finish_split

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
GSM8K_FINAL = re.compile(r"(?:^|####)\s*([-+]?[\d,]*\.?\d+)\s*$")  # "... #### 42" or "42"


def _open(data: str, revision: str | None) -> Mapping[str, Any]:
    """Split -> `datasets.Dataset` of a local copy (a folder) or a hub id (needs the network or a cache)."""
    import datasets

    local = Path(data).exists()
    if not local and not HUB_ID.match(data):
        raise DataNotFound(f"dataset not found: {data!r} is neither a local folder nor a hub id (owner/name)")
    if local and not Path(data).is_dir():
        raise DataNotFound(
            f"{data}: a hub-layout dataset is a folder (e.g. data/<split>-*.parquet), not a file"
        )
    if local and revision is not None:
        log.info("%s is a local copy: revision %r is not checked", data, revision)
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        if local:  # read into memory through a throwaway cache: no second copy of the data on disk
            with tempfile.TemporaryDirectory(prefix="vlmerge-data-") as cache:
                return dict(datasets.load_dataset(data, cache_dir=cache, keep_in_memory=True))
        return dict(datasets.load_dataset(data, revision=revision))
    except Exception as error:  # datasets raises many types (offline, missing files, bad parquet, schema)
        where = f"local copy {data!r}" if local else f"hub dataset {data!r} (revision {revision or 'main'})"
        hint = "" if local else "; the hub may be unreachable: download it once and pass the local folder"
        raise VlmergeError(f"cannot load {where}: {type(error).__name__}: {error}{hint}") from error
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _rows(table: Any, split: str, source: str, columns: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    missing = [column for column in columns if column not in table.column_names]
    if missing:
        raise VlmergeError(
            f"{source} split {split!r}: missing column(s) {missing} (columns: {table.column_names})"
        )
    if "image" in table.column_names:
        import datasets

        table = table.cast_column("image", datasets.Image(decode=False))  # keep bytes; decode on use
    yield from enumerate(table)


def _image(cell: Any) -> ImageRef:
    """A hub image cell ({bytes, path} undecoded); an absent image stays an empty ref for `check_images`."""
    if not cell:
        return ImageRef()
    if cell.get("bytes") is not None:
        return ImageRef(data=cell["bytes"])
    return ImageRef(path=Path(cell["path"])) if cell.get("path") else ImageRef()


def _text(value: Any, where: str, name: str) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise VlmergeError(f"{where}: missing field {name!r}")
    return str(value)


def _load(
    data: str,
    revision: str | None,
    splits: Mapping | None,
    limit: int | None,
    defaults: Mapping[str, str | None],
    make_items: Callable[[Any, str, str], list[Item]],
) -> Dataset:
    """Open, pick the role splits, build and check their items: only the splits given a role are read."""
    tables = _open(data, revision)
    name = Path(data).name if Path(data).exists() else data.split("/")[-1]
    roles = declare_roles(name, tables, defaults, splits)
    wanted = dict.fromkeys(split for split in roles.values() if split is not None)
    if not wanted:
        raise VlmergeError(
            f"dataset {data!r}: no split has a role (its splits: {sorted(tables)}); set splits"
        )
    loaded = {
        split: finish_split(make_items(tables[split], split, data), split, f"{data} split {split}", limit)
        for split in wanted
    }
    return Dataset(name, loaded, roles["search"], roles["heldout"], source=data)


def load_ja_vg_vqa(data: str, *, revision=None, splits=None, limit=None, qas: str = "all") -> Dataset:
    """JA-VG-VQA-500: search on `train` (the paper fits on a JA-VG-VQA train subset), hold out `test`.

    `qas="all"`: one item per question, id "<image_id>-<k>"; `qas="first"`: `qas[0]` only, as SakanaAI's
    evaluator scores it (500 test items).
    """
    if qas not in ("all", "first"):
        raise VlmergeError(f"ja_vg_vqa option qas must be 'all' or 'first', got {qas!r}")

    def make_items(table: Any, split: str, source: str) -> list[Item]:
        items = []
        for row_number, row in _rows(table, split, source, ("image_id", "qas", "image")):
            where = f"{source} split {split!r} row {row_number}"
            image_id = _text(row["image_id"], where, "image_id")
            pairs = row["qas"] or []
            if not pairs:
                raise VlmergeError(f"{where}: missing field 'qas' (no questions for image {image_id})")
            image = _image(row["image"])
            for k, qa in enumerate(pairs[:1] if qas == "first" else pairs):
                meta = {"image_id": row["image_id"], "qa_id": qa.get("qa_id"), "url": row.get("url")}
                question = _text(qa.get("question"), f"{where} qas[{k}]", "question")
                answer = _text(qa.get("answer"), f"{where} qas[{k}]", "answer")
                items.append(Item(f"{image_id}-{k}", question, (answer,), image, meta))
        return items

    return _load(data, revision, splits, limit, {"search": "train", "heldout": "test"}, make_items)


def load_ja_vlm_wild(data: str, *, revision=None, splits=None, limit=None) -> Dataset:
    """JA-VLM-Bench-In-the-Wild: a held-out benchmark only (`test`), ids are row numbers."""

    def make_items(table: Any, split: str, source: str) -> list[Item]:
        items = []
        for row_number, row in _rows(table, split, source, ("image", "question", "answer")):
            where = f"{source} split {split!r} row {row_number}"
            meta = {key: row[key] for key in ("page_url", "image_url") if key in row}
            question, answer = (
                _text(row["question"], where, "question"),
                _text(row["answer"], where, "answer"),
            )
            items.append(Item(str(row_number), question, (answer,), _image(row["image"]), meta))
        return items

    return _load(data, revision, splits, limit, {"search": None, "heldout": "test"}, make_items)


def gold_number(row: Mapping[str, Any], where: str) -> str:
    """The gold answer as written: `answer_number`, else a GSM8K `answer` ending '#### <n>' or just '<n>'."""
    number = row.get("answer_number")
    if isinstance(number, float) and number.is_integer():
        number = int(number)
    if number is not None and str(number).strip():
        return str(number).strip()
    match = GSM8K_FINAL.search(str(row.get("answer") or ""))
    if match is None:
        raise VlmergeError(f"{where}: missing field 'answer_number' (and no '#### <number>' in 'answer')")
    return match.group(1)


def load_gsm8k_ja(data: str, *, revision=None, splits=None, limit=None) -> Dataset:
    """GSM8K-ja test 250-1319: the EvoLLM-JP fitness set. Its only split `test` is the *search* split; the
    held-out set of that experiment is MGSM-ja (kind mgsm_tsv), so no held-out split is declared here."""

    def make_items(table: Any, split: str, source: str) -> list[Item]:
        items = []
        for row_number, row in _rows(table, split, source, ("question",)):
            where = f"{source} split {split!r} row {row_number}"
            meta = {"solution": row["answer"]} if row.get("answer") is not None else {}
            question = _text(row["question"], where, "question")
            items.append(Item(str(row_number), question, (gold_number(row, where),), None, meta))
        return items

    return _load(data, revision, splits, limit, {"search": "test", "heldout": None}, make_items)
