"""Data-flow-space paths: which layers of towers A and B a token runs through, and the scaling at each hop.

Layer space. The M = depth_a + depth_b layers of the two towers are numbered jointly: A's layer i is i, B's
layer j is depth_a + j. A `LayerPath` is a sequence of those indices (repeats allowed) and, for every hop
layers[k] -> layers[k+1], a positive scaling of the hidden state entering layers[k+1]. The embedding feeds the
first layer unscaled; A's embeddings, final norm and head frame the path.

Genome (the paper's form, arXiv 2403.13187 sec. 3.2). The layers are laid out in sequence, repeated r times:
slot t (0 <= t < T = M * r) holds layer t mod M, and is on when its indicator gene is > 0; the path is the on
slots in order. Then come the scaling genes; a scaling is exp(g), with g clipped to [log s_min, log s_max]
(x0: g = 0, scaling 1). Forms of W (`scaling`):
- `full`: the paper's W, M x M genes (row-major; W[i, j] scales the hop i -> j);
- `per_target`: M genes, the scaling depends only on the layer entered (W[i, j] = w[j]);
- `tower_pair`: 4 genes, by the towers of the hop (AA, AB, BA, BB);
- `none`: no genes, every scaling is 1.
Indicator start (`init`; x0 puts the on slots at +margin, the others at -margin):
- `a_first`: the first repetition's A slots (x0 decodes to exactly tower A; the paper favours A early);
- `a_every`: A's slots in every repetition;  `all`: every slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vlmerge.errors import VlmergeError

SCALINGS = ("full", "per_target", "tower_pair", "none")
INITS = ("a_first", "a_every", "all")
MAX_REPEATS = (
    16  # T = M * r slots; beyond this the exported stack is r times deeper than both towers together
)


class EmptyPathError(VlmergeError):
    """A candidate whose indicators select no layer (a search may score it as the worst instead)."""


@dataclass(frozen=True)
class LayerPath:
    """Layers in joint numbering (A: 0..depth_a-1, B: depth_a..M-1) and the scalings of the hops."""

    layers: tuple[int, ...]
    scales: tuple[float, ...]  # len(layers) - 1; scales[k] multiplies the state entering layers[k + 1]
    depth_a: int
    depth_b: int

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        m = self.depth_a + self.depth_b
        if self.depth_a < 1 or self.depth_b < 0:
            raise VlmergeError(
                f"path: tower depths must be >= 1 (A) and >= 0 (B), got {self.depth_a}, {self.depth_b}"
            )
        if not self.layers:
            raise EmptyPathError("path selects no layer: give at least one layer")
        outside = [i for i in self.layers if not 0 <= i < m]
        if outside:
            raise VlmergeError(
                f"path layers {outside} are outside 0..{m - 1} (A has {self.depth_a} layers, "
                f"B {self.depth_b})"
            )
        if len(self.scales) != len(self.layers) - 1:
            raise VlmergeError(
                f"path has {len(self.layers)} layers and {len(self.scales)} scalings; it needs "
                f"one scaling per hop ({len(self.layers) - 1})"
            )
        bad = [(k, s) for k, s in enumerate(self.scales) if not (math.isfinite(s) and s > 0)]
        if bad:
            k, s = bad[0]
            raise VlmergeError(
                f"path scaling {k} (hop {self.name(self.layers[k])} -> "
                f"{self.name(self.layers[k + 1])}) is {s}; scalings must be positive and finite"
            )
        cumulative = self.cumulative()
        if not all(math.isfinite(c) and c > 0 for c in cumulative):
            k = next(k for k, c in enumerate(cumulative) if not (math.isfinite(c) and c > 0))
            raise VlmergeError(
                f"path: the product of the scalings up to position {k} is {cumulative[k]}, "
                "outside the floating-point range"
            )

    @classmethod
    def identity(cls, depth_a: int, depth_b: int) -> LayerPath:
        """A's layers in order with unit scalings: tower A itself."""
        return cls(tuple(range(depth_a)), (1.0,) * (depth_a - 1), depth_a, depth_b)

    def name(self, layer: int) -> str:
        return f"A{layer}" if layer < self.depth_a else f"B{layer - self.depth_a}"

    def steps(self) -> tuple[tuple[str, int], ...]:
        """("A", i) or ("B", j) for every position."""
        return tuple(("A", i) if i < self.depth_a else ("B", i - self.depth_a) for i in self.layers)

    def cumulative(self) -> tuple[float, ...]:
        """C_k: the product of the scalings before position k (C_0 = 1); the fold divides position k by it."""
        out = [1.0]
        for s in self.scales:
            out.append(out[-1] * s)
        return tuple(out)

    def describe(self) -> str:
        parts = [self.name(self.layers[0])]
        for layer, s in zip(self.layers[1:], self.scales, strict=True):
            parts.append(f"x{s:.4g} {self.name(layer)}" if s != 1.0 else self.name(layer))
        return " ".join(parts)

    def to_dict(self) -> dict:
        return {
            "depth_a": self.depth_a,
            "depth_b": self.depth_b,
            "layers": [self.name(i) for i in self.layers],
            "scales": list(self.scales),
        }

    @classmethod
    def from_dict(cls, data: dict) -> LayerPath:
        """Inverse of `to_dict` (layers as "A3"/"B0" names or joint indices)."""
        missing = {"depth_a", "depth_b", "layers"} - set(data)
        if missing:
            raise VlmergeError(f"path: missing key(s) {sorted(missing)}")
        depth_a, depth_b = int(data["depth_a"]), int(data["depth_b"])
        layers = [_parse_layer(v, depth_a) for v in data["layers"]]
        scales = data.get("scales", [1.0] * max(len(layers) - 1, 0))
        return cls(tuple(layers), tuple(scales), depth_a, depth_b)


def _parse_layer(value, depth_a: int) -> int:
    if isinstance(value, str) and value[:1] in ("A", "B") and value[1:].isdigit():
        return int(value[1:]) + (depth_a if value[0] == "B" else 0)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise VlmergeError(f"path: layer {value!r} is neither a joint index nor a name like 'A3' / 'B0'")


@dataclass(frozen=True)
class PathSpec:
    """The DFS genome: genes <-> LayerPath (see the module docstring for the layout and transforms)."""

    depth_a: int
    depth_b: int
    repeats: int = 3
    scaling: str = "full"
    init: str = "a_first"
    margin: float = 0.5
    scale_min: float = 0.25
    scale_max: float = 4.0
    layers: int | None = None  # M, when given: checked against depth_a + depth_b

    def __post_init__(self):
        if self.depth_a < 1 or self.depth_b < 1:
            raise VlmergeError(
                f"merge.path: tower depths must be >= 1, got A {self.depth_a}, B {self.depth_b}"
            )
        if self.layers is not None and self.layers != self.depth_a + self.depth_b:
            raise VlmergeError(
                f"merge.path.layers (M) = {self.layers} but the towers have {self.depth_a} (A) + "
                f"{self.depth_b} (B) = {self.depth_a + self.depth_b} layers"
            )
        if not (isinstance(self.repeats, int) and 1 <= self.repeats <= MAX_REPEATS):
            raise VlmergeError(
                f"merge.path.repeats (r) = {self.repeats!r}: use an integer in 1..{MAX_REPEATS}"
            )
        if self.scaling not in SCALINGS:
            raise VlmergeError(f"merge.path.scaling = {self.scaling!r}: use one of {list(SCALINGS)}")
        if self.init not in INITS:
            raise VlmergeError(f"merge.path.init = {self.init!r}: use one of {list(INITS)}")
        if not (math.isfinite(self.margin) and self.margin > 0):
            raise VlmergeError(f"merge.path.margin = {self.margin}: must be positive")
        if not (0 < self.scale_min <= 1 <= self.scale_max < math.inf):
            raise VlmergeError(
                f"merge.path scale range [{self.scale_min}, {self.scale_max}] must be positive, "
                "finite and contain 1"
            )

    @property
    def m(self) -> int:
        return self.depth_a + self.depth_b

    @property
    def n_slots(self) -> int:
        return self.m * self.repeats

    @property
    def n_scale_genes(self) -> int:
        return {"full": self.m * self.m, "per_target": self.m, "tower_pair": 4, "none": 0}[self.scaling]

    @property
    def n_genes(self) -> int:
        return self.n_slots + self.n_scale_genes

    def x0(self) -> np.ndarray:
        slot_layer = np.arange(self.n_slots) % self.m
        if self.init == "a_first":
            on = np.arange(self.n_slots) < self.depth_a
        elif self.init == "a_every":
            on = slot_layer < self.depth_a
        else:
            on = np.ones(self.n_slots, dtype=bool)
        indicators = np.where(on, self.margin, -self.margin)
        return np.concatenate([indicators, np.zeros(self.n_scale_genes)])

    def labels(self) -> list[str]:
        """One readable name per gene (for logs and plots)."""
        name = LayerPath((0,), (), self.depth_a, self.depth_b).name
        out = [f"on[r{t // self.m}:{name(t % self.m)}]" for t in range(self.n_slots)]
        if self.scaling == "full":
            out += [f"W[{name(i)}->{name(j)}]" for i in range(self.m) for j in range(self.m)]
        elif self.scaling == "per_target":
            out += [f"W[->{name(j)}]" for j in range(self.m)]
        elif self.scaling == "tower_pair":
            out += [f"W[{a}->{b}]" for a in "AB" for b in "AB"]
        return out

    def _scale_gene(self, i: int, j: int) -> int:
        """Index (within the scaling block) of the gene that scales the hop i -> j."""
        if self.scaling == "full":
            return i * self.m + j
        if self.scaling == "per_target":
            return j
        return 2 * int(i >= self.depth_a) + int(j >= self.depth_a)

    def decode(self, x) -> LayerPath:
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.n_genes,):
            raise VlmergeError(
                f"DFS genome needs {self.n_genes} genes ({self.n_slots} indicators + "
                f"{self.n_scale_genes} scalings), got shape {x.shape}"
            )
        bad = np.flatnonzero(~np.isfinite(x))
        if bad.size:
            raise VlmergeError(
                f"DFS gene {int(bad[0])} ({self.labels()[bad[0]]}) is {x[bad[0]]}; genes must be finite"
            )
        slots = np.flatnonzero(x[: self.n_slots] > 0)
        if not slots.size:
            raise EmptyPathError(
                f"DFS candidate selects no layer: all {self.n_slots} indicator genes are <= 0"
            )
        layers = tuple(int(t % self.m) for t in slots)
        logs = np.clip(x[self.n_slots :], math.log(self.scale_min), math.log(self.scale_max))
        if self.scaling == "none":
            scales = (1.0,) * (len(layers) - 1)
        else:
            scales = tuple(float(np.exp(logs[self._scale_gene(i, j)])) for i, j in zip(layers, layers[1:]))
        return LayerPath(layers, scales, self.depth_a, self.depth_b)

    def encode(self, path: LayerPath) -> np.ndarray:
        """Genes that decode to `path` (unused scaling genes 0); refuses a path this genome cannot express."""
        if (path.depth_a, path.depth_b) != (self.depth_a, self.depth_b):
            raise VlmergeError(
                f"path is for towers of {path.depth_a} + {path.depth_b} layers, the genome for "
                f"{self.depth_a} + {self.depth_b}"
            )
        indicators = np.full(self.n_slots, -self.margin)
        slot = 0
        for k, layer in enumerate(path.layers):
            slot += (layer - slot) % self.m  # the next slot holding this layer
            if slot >= self.n_slots:
                raise VlmergeError(
                    f"path position {k} ({path.name(layer)}) does not fit in {self.repeats} "
                    f"repetition(s) of the {self.m} layers; raise merge.path.repeats"
                )
            indicators[slot] = self.margin
            slot += 1
        scale_genes = np.zeros(self.n_scale_genes)
        set_by: dict[int, float] = {}
        lo, hi = math.log(self.scale_min), math.log(self.scale_max)
        for (i, j), s in zip(zip(path.layers, path.layers[1:]), path.scales, strict=True):
            hop = f"{path.name(i)} -> {path.name(j)}"
            if self.scaling == "none":
                if s != 1.0:
                    raise VlmergeError(f"path scaling {s} on {hop}: merge.path.scaling = none allows only 1")
                continue
            g, log_s = self._scale_gene(i, j), math.log(s)
            if not lo - 1e-12 <= log_s <= hi + 1e-12:
                raise VlmergeError(
                    f"path scaling {s} on {hop} is outside [{self.scale_min}, {self.scale_max}]"
                )
            if g in set_by and not math.isclose(set_by[g], log_s, rel_tol=1e-9, abs_tol=1e-12):
                raise VlmergeError(
                    f"path scalings disagree on gene {self.labels()[self.n_slots + g]} "
                    f"({math.exp(set_by[g])} vs {s} on {hop}); scaling form {self.scaling!r} "
                    "shares it"
                )
            set_by[g] = log_s
            scale_genes[g] = log_s
        return np.concatenate([indicators, scale_genes])
