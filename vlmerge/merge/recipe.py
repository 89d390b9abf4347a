"""A merge recipe: which op, and the parameters of every source for every tower tensor.

Granularity is given by rules. A rule selects tensors by any combination of `source` (a source name),
`layers` (an inclusive range `[first, last]` of target-tower layers: any contiguous group), `kind`
(attention, mlp, norm, embedding, other) and `match` (a substring of the tower name, like mergekit's
`filter`), and sets parameters (`weight`, `density`, `gamma` per source; `t` for slerp). A recipe a user wrote
may set only parameters its op reads (`op_params`): `density` with `linear` would be ignored, so it is refused
(`Recipe.check_read`, run on recipe files by vlmerge-merge, vlmerge-eval and search=fixed, and on `baselines`).

Precedence: built-in defaults, then the rules **in order**: a later rule that selects a tensor overrides what
an earlier one set. Write the general rules first (global, then per source, per layer group, per kind).
A rule without `source` sets the value for every source.

What "a rule selects no tensor" means (refused by `Recipe.check_selects`, which `merger.check_sources` runs once
per pool before any merge): rules are matched against the *target's* language tower only, by its tower names,
layers and kinds. `source` never narrows the tensors (it says whose column the values go to), and every selected
target tensor has its counterpart in each donor and the base (the pool's coverage check), so a rule cannot
select tensors for one source and none for another. Each selector a rule gives must, on its own, select at least
one tensor of that tower: `layers` a layer the tower has, `kind` a kind one of its tensors has, `match` a
substring of one of its tower names. A rule written for another tower (`layers: [40, 40]` on 6 layers, the name
of a vision-tower tensor, a typo) is refused, naming the rule and what the tower has. Tensors that `pool.keep`
keeps count as the tower's: what a recipe means does not depend on what one pool leaves unmerged. A rule whose
selectors each select tensors but whose combination selects none is accepted: generated recipes have such rules
legitimately, selecting nothing in one place but something in another (a genome's per-kind cell of a layer
group for a kind that lives outside the layers, like `embedding`; the per-layer rules of a mergekit gradient
whose filter names `lm_head`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from vlmerge.errors import VlmergeError
from vlmerge.merge.ops import OPS, OpArgs, get_op
from vlmerge.models.towers import KINDS, layer_of, module_kind
from vlmerge.user_input import string_list

SOURCE_PARAMS = ("weight", "density", "gamma")
TENSOR_PARAMS = ("t",)
DEFAULTS = {"weight": 1.0, "density": 1.0, "gamma": 0.01, "t": 0.5}
# value ranges the ops require: (low, high, low excluded); weight and t take any finite number
RANGES = {"density": (0.0, 1.0, True), "gamma": (0.0, 1.0, False)}
SELECTORS = ("source", "layers", "kind", "match")
RECIPE_KEYS = ("op", "sources", "rules", "normalize", "rescale", "lambda", "seed", "pool")


@dataclass(frozen=True)
class Rule:
    values: Mapping[str, float]
    source: str | None = None
    layers: tuple[int, int] | None = None
    kind: str | None = None
    match: str | None = None
    origin: str | None = field(default=None, compare=False, repr=False)  # where it was written, for messages

    def selects(self, name: str, layer: int | None, kind: str) -> bool:
        if self.layers is not None and (layer is None or not self.layers[0] <= layer <= self.layers[1]):
            return False
        if self.kind is not None and kind != self.kind:
            return False
        return self.match is None or self.match in name

    def selectors(self) -> dict:
        """The selectors the rule gives, as a recipe file writes them."""
        out = {}
        for key in SELECTORS:
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if key == "layers" else value
        return out

    def label(self, index: int) -> str:
        """The rule for a message: where it was written (or its index) and its selectors."""
        shown = ", ".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}" for k, v in self.selectors().items())
        return f"{self.origin or f'rules[{index}]'} {{{shown}}}"

    def to_dict(self) -> dict:
        return {**self.selectors(), **self.values}

    @classmethod
    def from_dict(cls, raw: Mapping, where: str) -> Rule:
        if not isinstance(raw, Mapping):
            raise VlmergeError(f"{where}: a rule must be a mapping like {{layers: [0, 7], weight: 0.5}}, got {raw!r}")
        unknown = [k for k in raw if k not in SELECTORS + SOURCE_PARAMS + TENSOR_PARAMS]
        if unknown:
            raise VlmergeError(
                f"{where}: unknown key(s) {sorted(map(str, unknown))}; selectors {list(SELECTORS)}, "
                f"parameters {list(SOURCE_PARAMS + TENSOR_PARAMS)}"
            )
        values = {k: _number(raw[k], f"{where}.{k}") for k in raw if k not in SELECTORS}
        if not values:
            raise VlmergeError(f"{where} = {dict(raw)!r} sets no parameter, so it changes nothing; give at least "
                               f"one of {list(SOURCE_PARAMS + TENSOR_PARAMS)}")  # fmt: skip
        for param, value in values.items():
            check_range(param, value, f"{where}.{param}")
        source = raw.get("source")
        if source is not None and not isinstance(source, str):
            raise VlmergeError(f"{where}.source = {source!r}: give one source name (one rule per source)")
        layers = None if raw.get("layers") is None else _layers(raw["layers"], f"{where}.layers")
        kind = raw.get("kind")
        if kind is not None and (not isinstance(kind, str) or kind not in KINDS):
            raise VlmergeError(f"{where}.kind = {kind!r}: unknown module kind; use one of {list(KINDS)}")
        match = raw.get("match")
        if match is not None and (not isinstance(match, str) or not match):
            raise VlmergeError(f"{where}.match = {match!r}: give a non-empty substring of tower tensor names "
                               "(like self_attn or model.layers.3.)")  # fmt: skip
        if source is not None and "t" in values:
            raise VlmergeError(f"{where}: `t` is not per source (slerp interpolates between two sources)")
        return cls(values=values, source=source, layers=layers, kind=kind, match=match, origin=where)


def op_params(op: str) -> tuple[str, ...]:
    """The rule parameters `op` reads (the others change nothing)."""
    spec = get_op(op)
    return spec.per_source + tuple(p for p in TENSOR_PARAMS if p in spec.shared)


def check_range(param: str, value: float, where: str, note: str = "") -> None:
    """Refuse a parameter value outside the range the ops take (RANGES), naming `where` (and `note`)."""
    if param in RANGES:
        low, high, open_low = RANGES[param]
        if not (low < value <= high if open_low else low <= value < high):
            interval = f"({low:g}, {high:g}]" if open_low else f"[{low:g}, {high:g})"
            raise VlmergeError(f"{where} = {value} is outside {interval}{note}")


def _layers(raw, where: str) -> tuple[int, int]:
    """`layers`: one layer (an int) or an inclusive range [first, last]."""
    items = list(raw) if isinstance(raw, Sequence) and not isinstance(raw, (str, bytes)) else [raw]
    if len(items) == 1:
        items *= 2
    ints = all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items)
    if len(items) != 2 or not ints or items[0] > items[1]:
        raise VlmergeError(f"{where} = {raw!r}: give a layer (like 3) or an inclusive range [first, last] "
                           "with 0 <= first <= last")  # fmt: skip
    return items[0], items[1]


def _number(value, where: str) -> float:
    if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise VlmergeError(f"{where} = {value!r} is not a number")
    if not math.isfinite(value):
        raise VlmergeError(f"{where} = {value} is not finite")
    return float(value)


def _switch(value, where: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise VlmergeError(f"{where} = {value!r}: give true, false or null (the op's default)")
    return value


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
                where = rule.origin or f"rules[{i}]"
                raise VlmergeError(f"{where}.source = {rule.source!r} is not one of the recipe's sources "
                                   f"{list(self.sources)}")  # fmt: skip
        _number(self.lambda_, "lambda")

    def check_selects(self, tower_names: Iterable[str]) -> None:
        """Refuse, in one message, every rule that selects no tensor of the target tower whose tower names are
        given (the meaning is in the module docstring)."""
        names = list(tower_names)
        layers = sorted({i for i in map(layer_of, names) if i is not None})
        kinds = sorted({module_kind(n) for n in names})
        problems = {}  # one entry per place the user wrote (a mergekit gradient makes several rules)
        for i, rule in enumerate(self.rules):
            why = []
            if rule.layers is not None and not any(rule.layers[0] <= j <= rule.layers[1] for j in layers):
                has = f"layers {_ranges(layers)}" if layers else "no layers"
                why.append(f"layers {list(rule.layers)} select no tensor: the target tower has {has}")
            if rule.kind is not None and rule.kind not in kinds:
                why.append(f"kind {rule.kind!r} selects no tensor: the target tower's tensors are of kinds {kinds}")
            if rule.match is not None and not any(rule.match in n for n in names):
                why.append(f"match {rule.match!r} selects no tensor: no target-tower tensor name contains it "
                           f"(they look like {', '.join(_examples(names, layers))})")  # fmt: skip
            if why:
                problems.setdefault((rule.origin or i, *why), f"{rule.label(i)}: " + ", and ".join(why))
        if problems:
            raise VlmergeError("recipe rule(s) that would change nothing: " + "; ".join(problems.values()))

    def check_read(self) -> None:
        """Refuse, in one message, every parameter a rule sets that the op does not read (it would be ignored),
        naming the rule's place and the ops that read it. Run where users write recipes (recipe files,
        `baselines`); generated recipes (genome, mergekit import) set only parameters their op reads."""
        problems = []
        for i, rule in enumerate(self.rules):
            for param in rule.values:
                if param not in op_params(self.op):
                    readers = [name for name in OPS if param in op_params(name)]
                    problems.append(f"{rule.origin or f'rules[{i}]'}.{param}: op {self.op!r} does not read {param} "
                                    f"(ops that do: {', '.join(readers)})")  # fmt: skip
        if problems:
            them = "it" if len(problems) == 1 else "them"
            raise VlmergeError("; ".join(problems) + f"; op {self.op!r} reads only {', '.join(op_params(self.op))}: "
                               f"remove {them} or choose an op that reads {them}")  # fmt: skip

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
        """A recipe from its mapping; every field is checked here, naming `where` (the file) and the key."""
        unknown = [k for k in raw if k not in RECIPE_KEYS]
        if unknown:
            raise VlmergeError(f"{where}: unknown key(s) {sorted(map(str, unknown))}; known: {list(RECIPE_KEYS)}")
        for key in ("op", "sources"):
            if key not in raw:
                raise VlmergeError(f"{where}: missing `{key}`")
        op = raw["op"]
        if not isinstance(op, str) or op not in OPS:
            raise VlmergeError(f"{where}.op: unknown merge op {op!r}; known ops: {', '.join(OPS)}")
        sources = string_list(raw["sources"], f"{where}.sources", "sources: [target, DONOR, ...]", single=False)
        twice = sorted({s for s in sources if sources.count(s) > 1})
        if not sources or twice:
            raise VlmergeError(f"{where}.sources = {sources}: list the target first, then the donors, each once"
                               + (f" ({twice} appear twice)" if twice else ""))  # fmt: skip
        n = get_op(op).n_sources
        if n is not None and len(sources) != n:
            raise VlmergeError(f"{where}.sources = {sources}: op {op!r} merges exactly {n} sources")
        raw_rules = raw.get("rules")
        if raw_rules is None:
            raw_rules = []
        if not isinstance(raw_rules, Sequence) or isinstance(raw_rules, (str, bytes)):
            raise VlmergeError(f"{where}.rules = {raw_rules!r}: give a list of rules, like "
                               "[{weight: 1.0}, {layers: [0, 7], weight: 0.5}]")  # fmt: skip
        rules = tuple(Rule.from_dict(r, f"{where}.rules[{i}]") for i, r in enumerate(raw_rules))
        seed = raw.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise VlmergeError(f"{where}.seed = {seed!r}: give an integer (the DARE masks' seed)")
        pool = raw.get("pool")
        if pool is not None and not isinstance(pool, Mapping):
            raise VlmergeError(f"{where}.pool = {pool!r}: give a mapping (target: ..., donors: {{NAME: ...}}, "
                               "base: ...)")  # fmt: skip
        lambda_ = raw.get("lambda")
        return cls(
            op=op,
            sources=tuple(sources),
            rules=rules,
            normalize=_switch(raw.get("normalize"), f"{where}.normalize"),
            rescale=_switch(raw.get("rescale"), f"{where}.rescale"),
            lambda_=1.0 if lambda_ is None else _number(lambda_, f"{where}.lambda"),
            seed=0 if seed is None else seed,
            pool=pool,
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


def _ranges(values: list[int]) -> str:
    """Sorted ints as runs: 0..5, or 0..3, 6..7 when there are gaps."""
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            runs.append(f"{values[start]}..{values[i - 1]}" if i - 1 > start else f"{values[start]}")
            start = i
    return ", ".join(runs)


def _examples(names: list[str], layers: list[int], limit: int = 4) -> list[str]:
    """A few tower names to show: one of each kind in the first layer, then a non-layer one."""
    first = {}
    for name in sorted(n for n in names if layers and layer_of(n) == layers[0]):
        first.setdefault(module_kind(name), name)
    outer = sorted(n for n in names if layer_of(n) is None)
    return [*list(first.values())[: limit - 1], *outer][:limit]
