"""Vocabulary check: merged embedding rows must mean the same token in every model."""

from __future__ import annotations

import logging

from vlmerge.errors import VlmergeError
from vlmerge.models.towers import EMBED

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def id_to_token(folder) -> list[str] | None:
    """The tokenizer's id -> string table, None when the folder has no tokenizer.

    A `tokenizer.json` is read with the `tokenizers` library (0.01 s, against ~2 s to import transformers);
    other formats go through AutoTokenizer.
    """
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as err:  # noqa: BLE001  (reported, not fatal: the weights may still merge)
            log.warning("cannot read %s (%s); vocabulary not checked", folder / "tokenizer.json", err)
            return None
        return [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size(with_added_tokens=True))]
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # a broken tokenizer is reported, not fatal: the weights may still merge
        log.warning("cannot load the tokenizer of %s (%s); vocabulary not checked", folder, err)
        return None
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def check_vocab(towers: list, plan, *, allow_mismatch: bool = False) -> None:
    """Refuse towers whose tokenizers map a merged (shared) id to different strings."""
    embed = next((t for t in plan.tensors if t.name == EMBED), None)
    if embed is None:
        return
    shared = embed.rows or embed.shape[0]
    tables = {}
    for tower in dict.fromkeys(towers):  # the base may be the target
        table = id_to_token(tower.tower_folder)
        if table is None:
            log.warning("%s (%s) has no tokenizer files; vocabulary not checked", tower.role, tower.folder)
            continue
        tables[tower.role] = table
    if len(tables) < 2:
        return
    (ref_role, ref), *others = tables.items()
    for role, table in others:
        upto = min(shared, len(ref), len(table))
        diffs = [i for i in range(upto) if ref[i] != table[i]]
        if not diffs:
            continue
        shown = ", ".join(f"{i}: {ref[i]!r} vs {table[i]!r}" for i in diffs[:5])
        message = (f"vocabulary mismatch between {ref_role} and {role}: {len(diffs)} of {upto} shared token ids "
                   f"map to different strings ({shown})")
        if not allow_mismatch:
            raise VlmergeError(message + "; pass allow_vocab_mismatch=true to merge anyway")
        log.warning("%s (merging anyway: allow_vocab_mismatch=true)", message)
