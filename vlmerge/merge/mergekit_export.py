"""vlmerge recipe -> the equivalent mergekit 0.1.5 YAML (text-path recipes; `recipe.mergekit.yaml` of a run).

Per-layer rules become one value per layer (mergekit's gradient read at t = i / (n - 1) hits each layer), kind
and match rules the broadest filters that give the same value to every tensor; every tensor's value is checked
against `Recipe.args_for` before anything is written. See mergekit_yaml.py for mergekit's reading rules.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import yaml

from vlmerge.errors import VlmergeError
from vlmerge.merge.mergekit_yaml import KIND_FILTERS, Value, _model, layer_t, value_at
from vlmerge.merge.ops import get_op
from vlmerge.merge.recipe import Recipe
from vlmerge.models.checkpoint import Checkpoint
from vlmerge.models.source import ModelRef
from vlmerge.models.towers import detect_family, layer_of, module_kind


def to_mergekit(recipe: Recipe, pool_cfg: Mapping, depth: int) -> dict:
    """The mergekit config that merges a causal-LM pool like `recipe` (what the text-path search exports).

    Per-layer and per-kind rules become per-layer value lists and filters; the result is checked tensor by
    tensor against the recipe while it is built. Refused: VLM targets (mergekit drops their language tower),
    layer maps and kept tensors, and a task-arithmetic recipe whose base is the target when the target's
    weight would still count (a normalising method without sign election).
    """
    pool = dict(pool_cfg)
    for key in ("layer_map", "keep"):
        if pool.get(key):
            raise VlmergeError(f"pool.{key} has no mergekit equivalent; cannot write a mergekit config")
    target = _model(_path_of(pool["target"]), "pool.target")
    donors = {n: _model(_path_of(r), f"pool.donors.{n}") for n, r in dict(pool.get("donors") or {}).items()}
    base = _model(_path_of(pool["base"]), "pool.base") if pool.get("base") is not None else target
    if tuple(recipe.sources) != ("target", *donors):
        raise VlmergeError(f"recipe sources {list(recipe.sources)} != the pool's {['target', *donors]}")
    folder = ModelRef(*target).resolve()
    spec = detect_family(folder)
    if spec.is_vlm:
        raise VlmergeError(f"the target {target[0]} is a VLM ({spec.family}); mergekit cannot merge inside a "
                           "VLM's language tower, so there is no equivalent mergekit config")  # fmt: skip
    if spec.depth(folder) != depth:
        raise VlmergeError(f"depth {depth} given, but {target[0]} has {spec.depth(folder)} layers")
    checkpoint = Checkpoint(folder)
    names = [n for n in map(spec.tower_name, checkpoint.names) if n is not None]
    op = get_op(recipe.op)
    hints = [*dict.fromkeys(r.match for r in recipe.rules if r.match), *KIND_FILTERS]

    def expected(param: str, index: int) -> dict[str, float]:
        args = [recipe.args_for(n, layer_of(n), module_kind(n)) for n in names]
        return {n: a.t if param == "t" else getattr(a, param)[index] for n, a in zip(names, args)}

    def model_entry(source: str, model) -> dict:
        index = recipe.sources.index(source)
        params = [p for p in op.per_source if p == "weight" or any(p in r.values for r in recipe.rules)]
        setting = {p: _setting(expected(p, index), depth, hints, f"{source}.{p}") for p in params}
        return {"model": _mk_model(model), **({"parameters": setting} if setting else {})}

    sources = {"target": target, **donors}
    out: dict = {"merge_method": op.name}
    top: dict = {}
    if op.name == "slerp":
        out["base_model"] = _mk_model(target)
        out["models"] = [{"model": _mk_model(target)}, {"model": _mk_model(donors[recipe.sources[1]])}]
        top["t"] = _setting(expected("t", 0), depth, hints, "t")
    elif op.needs_base:
        out["base_model"] = _mk_model(base)
        listed = [s for s, m in sources.items() if m != base]
        normalize = op.normalize if recipe.normalize is None else recipe.normalize
        if base == target and not op.consensus and normalize and any(expected("weight", 0).values()):
            raise VlmergeError(f"{op.name} with the target as base: the target's weight counts in the "
                               "normalisation here but mergekit never merges its base; set its weight to 0")
        out["models"] = [model_entry(s, sources[s]) for s in listed]
    else:
        out["models"] = [model_entry(s, m) for s, m in sources.items()]
    for key, value in (("normalize", recipe.normalize), ("rescale", recipe.rescale)):
        if value is not None and key in op.shared:
            top[key] = value
    if "lambda_" in op.shared and recipe.lambda_ != 1:
        top["lambda"] = recipe.lambda_
    if top:
        out["parameters"] = top
    out["dtype"] = "float32"  # vlmerge's default compute_dtype
    stored = _DTYPE_NAMES.get(checkpoint.dtype(checkpoint.names[0]))
    if stored not in (None, "float32"):
        out["out_dtype"] = stored  # vlmerge writes the target's dtype
    return out


def to_mergekit_yaml(recipe: Recipe, pool_cfg: Mapping, depth: int) -> str:
    return yaml.dump(to_mergekit(recipe, pool_cfg, depth), Dumper=_FlowNumbers, sort_keys=False)


class _FlowNumbers(yaml.SafeDumper):
    """Lists of numbers on one line, like mergekit's own dumper."""

    def represent_list(self, data):
        flow = all(isinstance(e, (int, float)) for e in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowNumbers.add_representer(list, _FlowNumbers.represent_list)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _path_of(ref) -> str | dict:
    return ref if isinstance(ref, str) else {"path": ref["path"], "revision": ref.get("revision")}


def _mk_model(model: tuple[str, str | None]) -> str:
    return model[0] if model[1] is None else f"{model[0]}@{model[1]}"


def _setting(expected: Mapping[str, float], depth: int, hints: list[str], what: str):
    """A mergekit setting giving every tensor its expected value: one value, one per-layer list, or filters.

    Tensors are grouped by layer-free name; the value that fits most tensors is the catch-all, the others get
    the broadest filters (hints first, then the group's own names) that capture only tensors they fit.
    """

    def fits(value: Value, name: str) -> bool:
        layer = layer_of(name)
        got = value_at(value, 0.0 if layer is None else layer_t(layer, depth))
        return abs(got - expected[name]) <= 1e-12 * max(1.0, abs(expected[name]))

    classes: dict[str, list[str]] = {}  # filter key (full name, or ".suffix" of a layer tensor) -> names
    for name in expected:
        classes.setdefault(name if layer_of(name) is None else "." + name.split(".", 3)[3], []).append(name)
    groups: dict[str, list[str]] = {}
    values: dict[str, Value] = {}
    for key, members in classes.items():
        members.sort(key=lambda n: layer_of(n) or 0)
        if key.startswith(".") and [layer_of(n) for n in members] != list(range(depth)):
            groups.update((n, [n]) for n in members)  # not in every layer: one filter per tensor
            values.update((n, expected[n]) for n in members)
            continue
        per = tuple(expected[n] for n in members)
        groups[key], values[key] = members, per[0] if len(set(per)) == 1 else per
    default = max(dict.fromkeys(values.values()), key=lambda v: sum(fits(v, n) for n in expected))
    taken: set[str] = set()
    conds: list[dict] = []
    for value in dict.fromkeys(v for k, v in values.items() if not all(fits(default, n) for n in groups[k])):
        need = {n for k, v in values.items() if v == value for n in groups[k] if not fits(default, n)} - taken
        for flt in [*hints, *(k for k, v in values.items() if v == value)]:
            captured = {n for n in expected if flt in n} - taken
            if need & captured and all(fits(value, n) for n in captured):
                conds.append({"filter": flt, "value": _plain(value)})
                taken |= captured
                need -= captured
        if need:
            raise VlmergeError(f"{what}: no mergekit filter selects exactly {sorted(need)[:3]}")
    if not conds:
        return _plain(default)
    return [*conds, {"value": _plain(default)}]


def _plain(value: Value) -> float | list[float]:
    return list(value) if isinstance(value, tuple) else value
