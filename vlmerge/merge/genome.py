"""The genome: a real vector <-> a merge recipe, for CMA-ES.

Cells. The tower is cut into *groups* (`groups`): `model` (one group: the whole tower), `layer` (one group per
layer), an int n (n contiguous groups of nearly equal size; the first `depth % n` groups get one layer more),
or explicit inclusive ranges `[[0, 3], [4, 9], ...]` that must cover 0..depth-1 in order. With `kinds`
(e.g. `[attention, mlp]`) every layer group has one cell per listed kind; the *first* listed kind is the
group's default and also covers tensors of unlisted kinds (layer norms follow attention in that example).
Every listed kind must have tensors in the target tower where its cells are (`check_kinds`, once the pool is
open): a kind the tower lacks, or a later kind like `embedding` with cells per layer group, would have genes that
change nothing.

Non-layer tensors (embeddings, final norm, head), by `outer`:
- `nearest` (default): no genes of their own. The input embedding takes the default cell of the first layer
  group, every other non-layer tensor (final norm, head) that of the last. With `groups: model` the whole
  tower is one group and the kind cells apply to non-layer tensors too (`kinds: [.., embedding]` gives
  embedding and head their own genes).
- `own`: two extra groups with their own genes: `pre` (the input embedding) and `post` (every other non-layer
  tensor), as in the EvoLLM-JP PS setting ("each layer, including input and output embeddings").

Genes. Every cell has, for every source and every searched per-source parameter (weight, density, gamma), one
gene, except where `frozen` fixes that source's parameter; and one gene for `t` (slerp) if searched. Order:
cells (pre, layer groups in order with kinds in listed order, post), then sources, then parameters.
Parameters the op reads but that are not searched come from `fixed` (or the recipe defaults).

Transforms (genes live in [0, 1]; CMA-ES starts at x0 = 0.5 with sigma0 = 1/6 as in the paper; a gene
outside [0, 1] is clipped, so the box edges are plateaus):
- weight  = w_max * clip(g, 0, 1)       (w_max default 2: x0 -> 1.0, up to 2 for extrapolation)
- density = clip(g, d_min, 1)           (d_min default 0.05: x0 -> 0.5; 0 would drop everything)
- gamma   = g_max * clip(g, 0, 1)       (g_max default 0.02: x0 -> 0.01, mergekit's default)
- t       = clip(g, 0, 1)               (x0 -> 0.5)

Recipe. `decode` writes rules in precedence order (later wins): `fixed`, `frozen` (per source), the global
cell (`post`, or for `nearest` the last group's default cell), the layer groups (default cell, then kind
cells), then the `pre` cell (match `model.embed_tokens.`). `encode` inverts it for recipes whose values are
uniform within each cell (checked on representative tensors: one per layer and kind, and the non-layer ones).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from vlmerge.errors import VlmergeError
from vlmerge.merge.ops import get_op
from vlmerge.merge.recipe import SOURCE_PARAMS, TENSOR_PARAMS, Recipe, Rule, op_params
from vlmerge.models.towers import EMBED, FINAL_NORM, HEAD, KINDS, layer_of, module_kind

PRE_MATCH = EMBED.rsplit("weight", 1)[0]  # "model.embed_tokens."
OUTER = ("nearest", "own")
# one representative tower name per kind for a layer (encode and plots look at these)
LAYER_REPRESENTATIVES = (
    ("attention", "model.layers.{i}.self_attn.q_proj.weight"),
    ("mlp", "model.layers.{i}.mlp.down_proj.weight"),
    ("norm", "model.layers.{i}.input_layernorm.weight"),
)
OUTER_REPRESENTATIVES = ((EMBED, "embedding"), (FINAL_NORM, "norm"), (HEAD, "embedding"))


@dataclass(frozen=True)
class Cell:
    """Tensors that share genes: a layer range (None: non-layer), a kind (None: any) and a name match."""

    label: str
    layers: tuple[int, int] | None = None
    kind: str | None = None
    match: str | None = None


@dataclass(frozen=True)
class Gene:
    cell: int  # index into the layout's cells
    source: str | None  # None for `t`
    param: str


@dataclass(frozen=True)
class Layout:
    """The genome bound to a tower depth and source list."""

    cells: tuple[Cell, ...]
    genes: tuple[Gene, ...]
    groups: tuple[tuple[int, int], ...]
    depth: int
    sources: tuple[str, ...]


@dataclass(frozen=True)
class Genome:
    op: str = "dare_ties"
    params: Sequence[str] = ("weight", "density")
    groups: int | str | Sequence[Sequence[int]] = "model"
    kinds: Sequence[str] | None = None
    outer: str = "nearest"
    frozen: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    fixed: Mapping[str, float] = field(default_factory=dict)
    w_max: float = 2.0
    d_min: float = 0.05
    g_max: float = 0.02
    normalize: bool | None = None
    rescale: bool | None = None
    lambda_: float = 1.0

    def __post_init__(self):
        spec = get_op(self.op)
        readable = op_params(self.op)
        _set(self, "params", tuple(str(p) for p in self.params))  # Hydra passes ListConfig / DictConfig
        _set(self, "kinds", None if self.kinds is None else tuple(str(k) for k in self.kinds))
        _set(
            self,
            "frozen",
            {
                str(s): {str(p): float(v) for p, v in dict(values).items()}
                for s, values in dict(self.frozen).items()
            },
        )
        _set(self, "fixed", {str(p): float(v) for p, v in dict(self.fixed).items()})
        if not isinstance(self.groups, (int, str)):
            _set(self, "groups", tuple(tuple(int(i) for i in g) for g in self.groups))
        bad = [p for p in self.params if p not in readable]
        if bad or not self.params or len(set(self.params)) != len(self.params):
            raise VlmergeError(
                f"merge.genome.params = {list(self.params)}: op {self.op!r} searches distinct "
                f"parameters among {list(readable)}"
            )
        self._check_groups()
        if self.kinds is not None and (
            not self.kinds
            or len(set(self.kinds)) != len(self.kinds)
            or any(k not in KINDS for k in self.kinds)
        ):
            raise VlmergeError(
                f"merge.genome.kinds = {list(self.kinds)}: give distinct kinds among {list(KINDS)}"
            )
        if self.outer not in OUTER:
            raise VlmergeError(f"merge.genome.outer = {self.outer!r}: use one of {list(OUTER)}")
        for source, values in self.frozen.items():
            for param, value in values.items():
                if param not in spec.per_source:
                    raise VlmergeError(
                        f"merge.genome.frozen.{source}.{param}: op {self.op!r} has per-source "
                        f"parameters {list(spec.per_source)}"
                    )
                _check_value(param, value, f"merge.genome.frozen.{source}.{param}")
        for param, value in self.fixed.items():
            if param in self.params or param not in readable:
                raise VlmergeError(
                    f"merge.genome.fixed.{param}: fix only parameters op {self.op!r} reads and "
                    f"the genome does not search ({[p for p in readable if p not in self.params]})"
                )
            _check_value(param, value, f"merge.genome.fixed.{param}")
        if not self.w_max > 0 or not 0 < self.d_min <= 1 or not 0 <= self.g_max < 1:
            raise VlmergeError(
                f"merge.genome: need w_max > 0, 0 < d_min <= 1, 0 <= g_max < 1; got w_max="
                f"{self.w_max}, d_min={self.d_min}, g_max={self.g_max}"
            )

    def _check_groups(self) -> None:
        groups = self.groups
        if isinstance(groups, bool) or (isinstance(groups, str) and groups not in ("model", "layer")):
            raise VlmergeError(
                f"merge.genome.groups = {groups!r}: use model, layer, a number of groups, "
                "or inclusive ranges [[0, 3], [4, 9], ...]"
            )
        if isinstance(groups, int) and groups < 1:
            raise VlmergeError(f"merge.genome.groups = {groups}: need at least one group")
        if isinstance(groups, tuple):
            ok = bool(groups) and all(len(g) == 2 and g[0] <= g[1] for g in groups) and groups[0][0] == 0
            ok = ok and all(b[0] == a[1] + 1 for a, b in zip(groups, groups[1:]))
            if not ok:
                raise VlmergeError(
                    f"merge.genome.groups = {[list(g) for g in groups]}: ranges [first, last] must "
                    "start at layer 0 and follow each other without gaps or overlaps"
                )

    # ---- layout -------------------------------------------------------------------------------------------
    def layer_groups(self, depth: int) -> tuple[tuple[int, int], ...]:
        groups = self.groups
        if groups == "model":
            return ((0, depth - 1),)
        if groups == "layer":
            return tuple((i, i) for i in range(depth))
        if isinstance(groups, int):
            if groups > depth:
                raise VlmergeError(f"merge.genome.groups = {groups}: the tower has only {depth} layers")
            sizes = [depth // groups + (1 if i < depth % groups else 0) for i in range(groups)]
            starts = np.cumsum([0, *sizes])
            return tuple((int(starts[i]), int(starts[i + 1]) - 1) for i in range(groups))
        if groups[-1][1] != depth - 1:
            raise VlmergeError(
                f"merge.genome.groups end at layer {groups[-1][1]}; the tower has {depth} layers "
                f"(0..{depth - 1})"
            )
        return groups

    def _whole(self, groups: Sequence[tuple[int, int]]) -> bool:
        """Whether the cells are the whole tower's (one group, no outer cells), not per layer group."""
        return len(groups) == 1 and self.outer == "nearest"

    def check_kinds(self, tower_names: Iterable[str], depth: int) -> None:
        """Refuse, in one message, every listed kind that no tensor of the target tower has, and, when the cells
        are per layer group, every non-default kind that no layer tensor has (a non-layer tensor takes a default
        or outer cell, so such a kind's genes would change nothing: `embedding` with several groups)."""
        if self.kinds is None:
            return
        names = list(tower_names)
        has = sorted({module_kind(n) for n in names})
        in_layers = sorted({module_kind(n) for n in names if layer_of(n) is not None})
        groups = self.layer_groups(depth)
        problems = []
        for kind in self.kinds:
            if kind not in has:
                problems.append(f"the target tower has no tensor of kind {kind!r} (its tensors are of kinds "
                                f"{has}): drop it")  # fmt: skip
            elif kind != self.kinds[0] and not self._whole(groups) and kind not in in_layers:
                why = f"{len(groups)} layer groups" if len(groups) > 1 else "outer: own"
                problems.append(f"kind {kind!r} has a cell per layer group ({why}) but no layer tensor of the "
                                f"target tower is of that kind (they are of kinds {in_layers}), so its genes would "
                                "change nothing: drop it, or give it its own genes with groups: model and outer: "
                                "nearest")  # fmt: skip
        if problems:
            raise VlmergeError(f"merge.genome.kinds = {list(self.kinds)}: " + "; ".join(problems))

    def layout(self, depth: int, sources: Sequence[str]) -> Layout:
        sources = tuple(sources)
        if depth < 1:
            raise VlmergeError(f"genome: tower depth must be >= 1, got {depth}")
        spec = get_op(self.op)
        if spec.n_sources is not None and len(sources) != spec.n_sources:
            raise VlmergeError(
                f"merge op {self.op!r} needs exactly {spec.n_sources} sources, got {list(sources)}"
            )
        unknown = [s for s in self.frozen if s not in sources]
        if unknown:
            raise VlmergeError(f"merge.genome.frozen names {unknown}, not among the sources {list(sources)}")
        groups = self.layer_groups(depth)
        whole = self._whole(groups)
        cells: list[Cell] = []
        if self.outer == "own":
            cells.append(Cell("pre", match=PRE_MATCH))
        for first, last in groups:
            label = "model" if whole else f"layers {first}-{last}"
            for j, kind in enumerate(self.kinds or (None,)):
                cells.append(
                    Cell(
                        label if kind is None else f"{label}/{kind}",
                        None if whole else (first, last),
                        None if j == 0 else kind,
                    )
                )
        if self.outer == "own":
            cells.append(Cell("post"))
        genes = []
        for c in range(len(cells)):
            for source in sources:
                genes += [
                    Gene(c, source, p)
                    for p in self.params
                    if p in SOURCE_PARAMS and p not in self.frozen.get(source, {})
                ]
            genes += [Gene(c, None, p) for p in self.params if p in TENSOR_PARAMS]
        return Layout(tuple(cells), tuple(genes), groups, depth, sources)

    def n_genes(self, depth: int, sources: Sequence[str]) -> int:
        return len(self.layout(depth, sources).genes)

    def x0(self, depth: int, sources: Sequence[str]) -> np.ndarray:
        return np.full(self.n_genes(depth, sources), 0.5)

    def gene_names(self, depth: int, sources: Sequence[str]) -> list[str]:
        layout = self.layout(depth, sources)
        return [
            "/".join(x for x in (layout.cells[g.cell].label, g.source, g.param) if x) for g in layout.genes
        ]

    # ---- transforms ---------------------------------------------------------------------------------------
    def _scale_floor(self, param: str) -> tuple[float, float]:
        """value = max(scale * clip(gene, 0, 1), floor); the value range is [floor, scale]."""
        return {"weight": (self.w_max, 0.0), "density": (1.0, self.d_min), "gamma": (self.g_max, 0.0)}.get(
            param, (1.0, 0.0)
        )

    def value(self, param: str, gene: float) -> float:
        scale, floor = self._scale_floor(param)
        return max(scale * min(max(float(gene), 0.0), 1.0), floor)

    def gene(self, param: str, value: float, where: str) -> float:
        scale, floor = self._scale_floor(param)
        if not floor <= value <= scale:
            raise VlmergeError(
                f"{where}: {param} = {value} is outside the genome's range [{floor}, {scale}] "
                "(see merge.genome.w_max / d_min / g_max)"
            )
        return value / scale if scale else 0.0

    # ---- decode / encode ----------------------------------------------------------------------------------
    def decode(
        self,
        x: Sequence[float],
        depth: int,
        sources: Sequence[str],
        *,
        seed: int = 0,
        pool: Mapping | None = None,
    ) -> Recipe:
        """The recipe of a gene vector (deterministic; rules in the precedence order of the docstring)."""
        layout = self.layout(depth, sources)
        x = np.asarray(x, dtype=float).reshape(-1)
        if x.size != len(layout.genes):
            raise VlmergeError(f"genome: vector has {x.size} genes, the layout needs {len(layout.genes)}")
        per_cell: list[dict[str | None, dict[str, float]]] = [{} for _ in layout.cells]
        for gene, g in zip(layout.genes, x):
            per_cell[gene.cell].setdefault(gene.source, {})[gene.param] = self.value(gene.param, g)
        rules = [Rule(values=dict(self.fixed))] if self.fixed else []
        rules += [Rule(values=dict(self.frozen[s]), source=s) for s in layout.sources if self.frozen.get(s)]

        def emit(c: int, as_cell: Cell) -> None:
            for source in (*layout.sources, None):
                if per_cell[c].get(source):
                    rules.append(
                        Rule(
                            values=per_cell[c][source],
                            source=source,
                            layers=as_cell.layers,
                            kind=as_cell.kind,
                            match=as_cell.match,
                        )
                    )

        cells = layout.cells
        layer_cells = [c for c, cell in enumerate(cells) if cell.label not in ("pre", "post")]
        defaults = [c for c in layer_cells if cells[c].kind is None]
        if self.outer == "own":
            emit(len(cells) - 1, Cell("post"))
        elif len(layout.groups) > 1:
            emit(defaults[-1], Cell("post"))
        for c in layer_cells:
            emit(c, cells[c])
        if self.outer == "own":
            emit(0, cells[0])
        elif len(layout.groups) > 1:
            emit(defaults[0], Cell("pre", match=PRE_MATCH))
        return Recipe(
            op=self.op,
            sources=layout.sources,
            rules=tuple(rules),
            normalize=self.normalize,
            rescale=self.rescale,
            lambda_=self.lambda_,
            seed=seed,
            pool=pool,
        )

    def cell_of(self, layout: Layout, name: str, layer: int | None, kind: str) -> int:
        """Index of the cell whose genes set a tensor (the documented rule, independent of the rules)."""
        cells = layout.cells
        if layer is None:
            if self.outer == "own":
                return 0 if name.startswith(PRE_MATCH) else len(cells) - 1
            if len(layout.groups) > 1:
                group = 0 if name.startswith(PRE_MATCH) else len(layout.groups) - 1
                return group * len(self.kinds or (None,))
        group = 0 if layer is None else next(i for i, (a, b) in enumerate(layout.groups) if a <= layer <= b)
        slots = self.kinds or (None,)
        start = (1 if self.outer == "own" else 0) + group * len(slots)
        return start + (slots.index(kind) if kind in slots[1:] else 0)

    def encode(self, recipe: Recipe, depth: int) -> np.ndarray:
        """The gene vector of a recipe that this genome can express (VlmergeError naming what it cannot)."""
        if recipe.op != self.op:
            raise VlmergeError(f"cannot encode a {recipe.op!r} recipe with a {self.op!r} genome")
        for key, mine, theirs in (
            ("normalize", self.normalize, recipe.normalize),
            ("rescale", self.rescale, recipe.rescale),
            ("lambda_", self.lambda_, recipe.lambda_),
        ):
            if mine != theirs:
                raise VlmergeError(f"cannot encode: recipe {key} = {theirs}, the genome has {mine}")
        layout = self.layout(depth, recipe.sources)
        seen: dict[tuple[int, str | None, str], tuple[float, str]] = {}
        for name, layer, kind in representatives(depth):
            args = recipe.args_for(name, layer, kind)
            c = self.cell_of(layout, name, layer, kind)
            for i, source in enumerate(layout.sources):
                for param in self.params:
                    value = args.t if param == "t" else getattr(args, param)[i]
                    key = (c, None if param == "t" else source, param)
                    if key in seen and seen[key][0] != value:
                        raise VlmergeError(
                            f"cannot encode: {param} of {source} differs within genome cell "
                            f"{layout.cells[c].label!r} ({seen[key][1]}: {seen[key][0]}, {name}: {value})"
                        )
                    seen.setdefault(key, (value, name))
                for param, want in [*self.fixed.items(), *self.frozen.get(source, {}).items()]:
                    value = args.t if param == "t" else getattr(args, param)[i]
                    if value != want:
                        raise VlmergeError(
                            f"cannot encode: {name} has {param} = {value} for {source}; the genome "
                            f"fixes it at {want}"
                        )
        return np.array(
            [
                self.gene(
                    g.param,
                    seen[(g.cell, g.source, g.param)][0],
                    f"recipe ({layout.cells[g.cell].label}, {g.source or 'all'})",
                )
                for g in layout.genes
            ]
        )


def representatives(depth: int) -> list[tuple[str, int | None, str]]:
    """(tower name, layer, kind): one tensor per layer and kind, then the non-layer tensors."""
    out = [(tpl.format(i=i), i, kind) for i in range(depth) for kind, tpl in LAYER_REPRESENTATIVES]
    return out + [(name, None, kind) for name, kind in OUTER_REPRESENTATIVES]


def _set(obj, key: str, value) -> None:
    object.__setattr__(obj, key, value)


def _check_value(param: str, value: float, where: str) -> None:
    if param == "density" and not 0 < value <= 1:
        raise VlmergeError(f"{where} = {value} is outside (0, 1]")
    if param == "gamma" and not 0 <= value < 1:
        raise VlmergeError(f"{where} = {value} is outside [0, 1)")
