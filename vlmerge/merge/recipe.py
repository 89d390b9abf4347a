"""A merge recipe: which op, and the parameters of every source for every tower tensor.

Granularity is given by rules. A rule selects tensors by any combination of `source` (a source name),
`layers` (an inclusive range `[first, last]` of target-tower layers: any contiguous group), `kind`
(attention, mlp, norm, embedding, other) and `match` (a substring of the tower name, like mergekit's
`filter`), and sets parameters (`weight`, `density`, `gamma` per source; `t` for slerp).

Precedence: built-in defaults, then the rules **in order**: a later rule that selects a tensor overrides what
an earlier one set. Write the general rules first (global, then per source, per layer group, per kind).
A rule without `source` sets the value for every source.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from vlmerge.errors import VlmergeError
from vlmerge.merge.ops import OpArgs, get_op
from vlmerge.models.towers import KINDS
from vlmerge.user_input import string_list

SOURCE_PARAMS = ("weight", "density", "gamma")
TENSOR_PARAMS = ("t",)
DEFAULTS = {"weight": 1.0, "density": 1.0, "gamma": 0.01, "t": 0.5}
SELECTORS = ("source", "layers", "kind", "match")
RECIPE_KEYS = ("op", "sources", "rules", "normalize", "rescale", "lambda", "seed", "pool")


@dataclass(frozen=True)
class Rule:
    values: Mapping[str, float]
    source: str | None = None
    layers: tuple[int, int] | None = None
    kind: str | None = None
    match: str | None = None

    def selects(self, name: str, layer: int | None, kind: str) -> bool:
        if self.layers is not None and (layer is None or not self.layers[0] <= layer <= self.layers[1]):
            return False
        if self.kind is not None and kind != self.kind:
            return False
        return self.match is None or self.match in name

    def to_dict(self) -> dict:
        out: dict = {}
        for key in SELECTORS:
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if key == "layers" else value
        out.update(self.values)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping, where: str) -> Rule:
        if not isinstance(raw, Mapping):
            raise VlmergeError(f"{where}: a rule must be a mapping, got {raw!r}")
        unknown = set(raw) - set(SELECTORS) - set(SOURCE_PARAMS) - set(TENSOR_PARAMS)
        if unknown:
            raise VlmergeError(
                f"{where}: unknown key(s) {sorted(unknown)}; selectors {list(SELECTORS)}, "
                f"parameters {list(SOURCE_PARAMS + TENSOR_PARAMS)}"
            )
        values = {k: _number(raw[k], f"{where}.{k}") for k in raw if k not in SELECTORS}
        if "density" in values and not 0 < values["density"] <= 1:
            raise VlmergeError(f"{where}.density = {values['density']} is outside (0, 1]")
        layers = raw.get("layers")
        if layers is not None:
            layers = (layers, layers) if isinstance(layers, int) else tuple(layers)
            if len(layers) != 2 or not all(isinstance(i, int) and i >= 0 for i in layers) or layers[0] > layers[1]:
                raise VlmergeError(f"{where}.layers = {raw['layers']!r}: give [first, last] with 0 <= first <= last")
        kind = raw.get("kind")
        if kind is not None and kind not in KINDS:
            raise VlmergeError(f"{where}.kind = {kind!r}: unknown module kind; use one of {list(KINDS)}")
        if raw.get("source") is not None and "t" in values:
            raise VlmergeError(f"{where}: `t` is not per source (slerp interpolates between two sources)")
        return cls(values=values, source=raw.get("source"), layers=layers, kind=kind, match=raw.get("match"))


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise VlmergeError(f"{where} = {value!r} is not a number")
    if not math.isfinite(value):
        raise VlmergeError(f"{where} = {value} is not finite")
    return float(value)


@dataclass(frozen=True)
class Recipe:
    """How to merge: op, source order (the target first), rules, global switches, seed for DARE."""

    op: str
    sources: tuple[str, ...]
    rules: tuple[Rule, ...] = ()
    normalize: bool | None = None
    rescale: bool | None = None
    lambda_: float = 1.0
    seed: int = 0
    pool: Mapping | None = field(default=None, compare=False)  # where the models are, for a self-contained file

    def __post_init__(self):
        get_op(self.op)
        if len(set(self.sources)) != len(self.sources) or not self.sources:
            raise VlmergeError(f"recipe sources must be distinct and non-empty, got {list(self.sources)}")
        for i, rule in enumerate(self.rules):
            if rule.source is not None and rule.source not in self.sources:
                raise VlmergeError(f"rules[{i}].source = {rule.source!r} is not one of {list(self.sources)}")
        _number(self.lambda_, "lambda")

    def args_for(self, name: str, layer: int | None, kind: str) -> OpArgs:
        """The op arguments of one tower tensor (resolved through the rules; see the module docstring)."""
        per_source = {p: [DEFAULTS[p]] * len(self.sources) for p in SOURCE_PARAMS}
        t = DEFAULTS["t"]
        index = {s: i for i, s in enumerate(self.sources)}
        for rule in self.rules:
            if not rule.selects(name, layer, kind):
                continue
            targets = range(len(self.sources)) if rule.source is None else (index[rule.source],)
            for param, value in rule.values.items():
                if param == "t":
                    t = value
                    continue
                for i in targets:
                    per_source[param][i] = value
        return OpArgs(
            weight=tuple(per_source["weight"]),
            density=tuple(per_source["density"]),
            gamma=tuple(per_source["gamma"]),
            t=t,
            normalize=self.normalize,
            rescale=self.rescale,
            lambda_=self.lambda_,
        )

    def to_dict(self) -> dict:
        out: dict = {"op": self.op, "sources": list(self.sources), "seed": self.seed}
        for key, value in (("normalize", self.normalize), ("rescale", self.rescale)):
            if value is not None:
                out[key] = value
        out["lambda"] = self.lambda_
        out["rules"] = [rule.to_dict() for rule in self.rules]
        if self.pool is not None:
            out["pool"] = _plain(self.pool)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping, where: str = "recipe") -> Recipe:
        unknown = set(raw) - set(RECIPE_KEYS)
        if unknown:
            raise VlmergeError(f"{where}: unknown key(s) {sorted(unknown)}; known: {list(RECIPE_KEYS)}")
        for key in ("op", "sources"):
            if key not in raw:
                raise VlmergeError(f"{where}: missing `{key}`")
        rules = tuple(Rule.from_dict(r, f"{where}.rules[{i}]") for i, r in enumerate(raw.get("rules") or []))
        return cls(
            op=raw["op"],
            sources=tuple(string_list(raw["sources"], f"{where}.sources", "sources: [target, DONOR, ...]",
                                      single=False)),
            rules=rules,
            normalize=raw.get("normalize"),
            rescale=raw.get("rescale"),
            lambda_=float(raw.get("lambda", 1.0)),
            seed=int(raw.get("seed", 0)),
            pool=raw.get("pool"),
        )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, text: str, where: str = "recipe") -> Recipe:
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise VlmergeError(f"{where}: not valid YAML ({err})") from None
        if not isinstance(raw, Mapping):
            raise VlmergeError(f"{where}: expected a mapping at the top level")
        return cls.from_dict(raw, where)

    def replace_rules(self, rules: tuple[Rule, ...]) -> Recipe:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Recipe(**{**values, "rules": rules})


def load_recipe(path: Path | str) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise VlmergeError(f"recipe file not found: {path}")
    return Recipe.from_yaml(path.read_text(), where=str(path))


def _plain(value):
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
