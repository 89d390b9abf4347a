"""The layer map and coverage check: which tensor of every source and of the base feeds each target tensor.

Found before any merge, so that a problem (unmapped tensor, shape mismatch) is one message up front:
every target-tower tensor is mapped or deliberately kept, every donor tensor is used or listed, shapes agree
(vocabulary rows excepted: only the rows all models share are merged, the target's extra rows are kept).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vlmerge.errors import VlmergeError
from vlmerge.models.towers import EMBED, HEAD, VOCAB_ROWS, layer_of, module_kind, with_layer


@dataclass(frozen=True)
class TensorPlan:
    """One target-tower tensor and where its inputs come from."""

    name: str  # tower name
    target_key: str  # checkpoint name in the target
    source_keys: tuple[str, ...]  # checkpoint names, one per source (the target first)
    base_key: str
    layer: int | None
    kind: str
    shape: tuple[int, ...]
    rows: int | None  # vocabulary rows shared by all models, when fewer than the target's


@dataclass(frozen=True)
class MergePlan:
    tensors: tuple[TensorPlan, ...]
    kept: tuple[str, ...]  # target-tower tensors deliberately kept as the target has them
    unused: dict[str, tuple[str, ...]]  # per source/base: checkpoint tensors no merge reads
    depth: int
    source_names: tuple[str, ...]

    def summary(self) -> str:
        rows = [t for t in self.tensors if t.rows is not None]
        lines = [
            f"coverage: target tower {len(self.tensors) + len(self.kept)} tensors in {self.depth} layers: "
            f"{len(self.tensors)} merged from {len(self.source_names)} sources "
            f"({', '.join(self.source_names)}), {len(self.kept)} kept"
        ]
        for tensor in rows:
            lines.append(f"  vocab rows of {tensor.name}: {tensor.rows} shared rows merged, "
                         f"{tensor.shape[0] - tensor.rows} extra rows kept from the target")
        for name, keys in self.unused.items():
            if keys:
                shown = ", ".join(keys[:6]) + (f", ... (+{len(keys) - 6})" if len(keys) > 6 else "")
                lines.append(f"  {name}: {len(keys)} tensors not used: {shown}")
        return "\n".join(lines)


def layer_map_lists(layer_map) -> dict[str, list[int]]:
    """`pool.layer_map` as {source or base: [its layer for each target layer]}; any other shape is refused, naming
    `pool.layer_map.<name>` and the value (checked before any model is opened)."""
    if layer_map is None:
        return {}
    if not isinstance(layer_map, Mapping):
        raise VlmergeError(f"pool.layer_map = {layer_map!r}: give a mapping {{DONOR: [DONOR layer for each "
                           "target layer, ...]}, like {ja: [0, 2, 4, 6]}")  # fmt: skip
    out = {}
    for name, mapping in layer_map.items():
        listed = isinstance(mapping, Sequence) and not isinstance(mapping, (str, bytes))
        if not listed or not all(isinstance(i, int) and not isinstance(i, bool) for i in mapping):
            raise VlmergeError(f"pool.layer_map.{name} = {mapping!r}: give a list of {name} layer indices (ints), "
                               "one for each target layer, like [0, 2, 4, 6]")  # fmt: skip
        out[name] = list(mapping)
    return out


def _check_layer_map(layer_map: dict[str, list[int]], towers: dict, depth: int) -> None:
    for name, mapping in layer_map.items():
        if name not in towers:
            raise VlmergeError(f"pool.layer_map names {name!r}, which is not a donor or the base ({list(towers)})")
        if len(mapping) != depth:
            raise VlmergeError(f"pool.layer_map.{name} = {mapping} has {len(mapping)} entries; the target tower has "
                               f"{depth} layers: give one {name} layer for each")  # fmt: skip
        bad = [i for i in mapping if not 0 <= i < towers[name].depth]
        if bad:
            raise VlmergeError(f"pool.layer_map.{name}: layers {bad} outside 0..{towers[name].depth - 1} "
                               f"(the layers of {name})")  # fmt: skip


def plan_merge(target, donors: dict, base, *, layer_map: dict[str, list[int]] | None = None,
               keep: tuple[str, ...] = ()) -> MergePlan:
    """Map every target-tower tensor to its counterparts in each donor and the base (Tower objects)."""
    layer_map = layer_map_lists(layer_map)
    others = {**donors, "base": base}
    _check_layer_map(layer_map, others, target.depth)
    for name, tower in others.items():
        if name not in layer_map and tower.depth != target.depth:
            raise VlmergeError(
                f"cannot map towers automatically: target has {target.depth} layers, {name} has {tower.depth}; "
                f"give pool.layer_map.{name} = a list of {target.depth} {name} layer indices"
            )
    keep_res = [_pattern(p) for p in keep]
    plans, kept, unmapped, mismatched = [], [], [], []
    used: dict[str, set[str]] = {name: set() for name in others}
    for tname, tkey in target.names.items():
        if any(r.search(tname) for r in keep_res):
            kept.append(tkey)
            continue
        layer = layer_of(tname)
        keys, rows = {}, None
        shape = target.checkpoint.shape(tkey)
        for name, tower in others.items():
            mapped = tname if layer is None or name not in layer_map else with_layer(tname, layer_map[name][layer])
            key = tower.key_of(mapped)
            if key is None:
                unmapped.append(f"{tname} (not in {name})")
                continue
            keys[name] = key
            other = tower.checkpoint.shape(key)
            if other != shape:
                if tname in VOCAB_ROWS and other[1:] == shape[1:]:
                    rows = min(rows or shape[0], other[0], shape[0])
                else:
                    mismatched.append(f"{tname}: target {list(shape)} vs {name} {list(other)}")
        if len(keys) == len(others):
            for name, key in keys.items():
                used[name].add(key)
            plans.append(TensorPlan(
                name=tname, target_key=tkey, source_keys=(tkey, *(keys[d] for d in donors)),
                base_key=keys["base"], layer=layer, kind=module_kind(tname), shape=shape,
                rows=rows if rows is not None and rows < shape[0] else None,
            ))  # fmt: skip
    if mismatched:
        raise VlmergeError("tensor shape mismatch: " + _listing(mismatched))
    if unmapped:
        raise VlmergeError(
            "towers cannot be mapped; unmapped target-tower tensors: " + _listing(unmapped)
            + " (give pool.layer_map, or pool.keep patterns to keep such tensors from the target)"
        )
    unused = {name: tuple(k for k in tower.checkpoint.names if k not in used[name]) for name, tower in others.items()
              if name != "base" or base is not target}  # fmt: skip
    return MergePlan(tensors=tuple(plans), kept=tuple(kept), unused=unused, depth=target.depth,
                     source_names=("target", *donors))  # fmt: skip


def _pattern(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise VlmergeError(f"pool.keep pattern {pattern!r} is not a valid regular expression ({err})") from None


def _listing(items: list[str], limit: int = 12) -> str:
    shown = "; ".join(items[:limit])
    return shown + (f"; ... and {len(items) - limit} more" if len(items) > limit else "")


def tied_head_alias(names: dict[str, str], tie_word_embeddings: bool) -> dict[str, str]:
    """A tied model has no lm_head tensor: its head is its embedding matrix."""
    if tie_word_embeddings and HEAD not in names and EMBED in names:
        return {**names, HEAD: names[EMBED]}
    return names
