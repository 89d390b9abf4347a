"""The model pool of a merge: a target (VLM or LLM), donors, and the base task vectors are taken against.

Built from `conf/pool/*.yaml`. Opening the pool reads only headers and configs; it checks everything a merge
needs (families, layer map, shapes, vocabulary) and prints the coverage summary, so that bad input is refused
before any work starts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vlmerge.errors import VlmergeError
from vlmerge.models.checkpoint import Checkpoint
from vlmerge.models.plan import MergePlan, layer_map_lists, plan_merge, tied_head_alias
from vlmerge.models.source import ModelRef, as_ref
from vlmerge.models.towers import TowerSpec, detect_family, read_config
from vlmerge.models.vocab import check_vocab
from vlmerge.user_input import string_list

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Tower:
    """One model of the pool, seen as its language tower."""

    role: str  # "target", a donor name, or "base"
    ref: ModelRef
    folder: Path  # the model folder (a composite's tower is in folder / spec.subdir)
    spec: TowerSpec
    checkpoint: Checkpoint
    names: dict[str, str]  # tower name -> checkpoint name
    depth: int

    @property
    def tower_folder(self) -> Path:
        return self.folder / self.spec.subdir

    def key_of(self, tower_name: str) -> str | None:
        return self._lookup.get(tower_name)

    def __post_init__(self):
        config = read_config(self.tower_folder)
        tied = config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False))
        self._lookup = tied_head_alias(self.names, bool(tied))


def open_tower(role: str, ref: ModelRef, *, allow_pickle: bool = False) -> Tower:
    folder = ref.resolve()
    spec = detect_family(folder)
    checkpoint = Checkpoint(folder / spec.subdir, allow_pickle=allow_pickle)
    names = {}
    for key in checkpoint.names:
        tower_name = spec.tower_name(key)
        if tower_name is not None:
            names[tower_name] = key
    if not names:
        raise VlmergeError(f"{role} model {folder}: no language-tower tensors found ({spec.family} family)")
    return Tower(role=role, ref=ref, folder=folder, spec=spec, checkpoint=checkpoint, names=names,
                 depth=spec.depth(folder))  # fmt: skip


class Pool:
    """Target, donors and base, opened and checked; `plan` maps every target-tower tensor to its inputs."""

    def __init__(
        self,
        target: ModelRef | str | Mapping,
        donors: Mapping[str, ModelRef | str | Mapping] | None = None,
        base: ModelRef | str | Mapping | None = None,
        layer_map: Mapping[str, list[int]] | None = None,
        keep: list[str] | tuple[str, ...] = (),
        allow_vocab_mismatch: bool = False,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        verbose: bool = True,
    ):
        donors = dict(donors or {})
        reserved = {"target", "base"} & set(donors)
        if reserved:
            raise VlmergeError(f"donor names {sorted(reserved)} are reserved; rename the donor(s)")
        self.trust_remote_code = trust_remote_code
        keep = string_list(keep, "pool.keep", "keep: [PATTERN, ...] (regular expressions of tower tensor names)")
        layer_map = layer_map_lists(layer_map)  # refused before any model is opened
        for name in layer_map:
            if name not in donors and name != "base":
                raise VlmergeError(f"pool.layer_map names {name!r}, which is not a donor or the base "
                                   f"({[*donors, 'base']})")  # fmt: skip
        self.options = {"layer_map": layer_map, "keep": keep,
                        "allow_vocab_mismatch": allow_vocab_mismatch, "allow_pickle": allow_pickle}
        self.target = open_tower("target", as_ref(target), allow_pickle=allow_pickle)
        self.donors = {name: open_tower(name, as_ref(ref), allow_pickle=allow_pickle) for name, ref in donors.items()}
        self.base = open_tower("base", as_ref(base), allow_pickle=allow_pickle) if base is not None else self.target
        self.plan: MergePlan = plan_merge(
            self.target, self.donors, self.base, layer_map=layer_map, keep=tuple(keep)
        )
        check_vocab([self.target, *self.donors.values(), self.base], self.plan, allow_mismatch=allow_vocab_mismatch)
        if verbose:
            print(self.plan.summary())

    @property
    def source_names(self) -> tuple[str, ...]:
        return self.plan.source_names

    @property
    def sources(self) -> list[Tower]:
        return [self.target, *self.donors.values()]

    def to_config(self) -> dict:
        """The pool as a plain mapping (written into recipe files so that they are self-contained)."""
        def ref(tower: Tower) -> dict:
            return {k: v for k, v in vars(tower.ref).items() if v is not None}

        out = {"target": ref(self.target), "donors": {n: ref(t) for n, t in self.donors.items()}}
        if self.base is not self.target:
            out["base"] = ref(self.base)
        return {**out, **{k: v for k, v in self.options.items() if v}}
