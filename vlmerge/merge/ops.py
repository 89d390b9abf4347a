"""Merge ops: small pure functions over a base tensor and stacked task vectors, with mergekit 0.1.5's meaning.

Every op has one signature::

    op(base: Tensor[*S], deltas: Tensor[n, *S], p: OpArgs, *, generator=None, stats=None) -> Tensor[*S]

`deltas[i]` = source_i - base, sources in a fixed order (the target first, then the donors). Every op
computes in float32 (float64 for float64 input; 16-bit inputs are upcast, as mergekit's slerp does) and returns
a new tensor of shape S in the input dtype, rounded once; inputs are never modified. These functions are the
reference; `merge.fused` computes the task-arithmetic family (all but slerp) in one pass per tensor, with the
same formula, and is what the exporter and the search run.

| op               | per source             | shared                      | normalize | rescale | base | rnd |
|------------------|------------------------|-----------------------------|-----------|---------|------|-----|
| linear           | weight                 | normalize                   | True      | -       | no   | no  |
| task_arithmetic  | weight                 | normalize, lambda_          | False     | -       | yes  | no  |
| ties             | weight, density        | normalize, rescale, lambda_ | True      | False   | yes  | no  |
| dare_ties        | weight, density        | normalize, rescale, lambda_ | False     | True    | yes  | yes |
| dare_linear      | weight, density        | normalize, rescale, lambda_ | False     | True    | yes  | yes |
| breadcrumbs      | weight, density, gamma | normalize, rescale, lambda_ | False     | False   | yes  | no  |
| breadcrumbs_ties | weight, density, gamma | normalize, rescale, lambda_ | False     | False   | yes  | no  |
| slerp            | -                      | t                           | -         | -       | no   | no  |

`normalize` / `rescale`: the default of each switch. Defaults are mergekit 0.1.5's (its registry.py):
density 1.0, gamma 0.01, lambda 1.0; weight and t have no mergekit default (OpArgs: weight must be given,
t defaults to 0.5). An empty `density` or `gamma` tuple means the default for every source. Parameters an
op does not read are ignored, not checked.

"base: no" ops are defined by mergekit on the sources alone; here they use x_i = base + deltas[i], and their
value does not depend on which base is chosen (up to float rounding):
- linear: normalize -> sum(w_i x_i) / sum(w_i) = base + sum(w_i d_i) / sum(w_i); otherwise sum(w_i x_i) =
  sum(w_i) base + sum(w_i d_i). (mergekit divides by sum(w) unguarded; a zero sum is refused here.)
- slerp: exactly two sources; x0 = base + deltas[0] (the target) is mergekit's base_model, the t = 0 end,
  x1 = base + deltas[1] the t = 1 end; angle from the whole flattened tensors, lerp when |cos| > 0.9995.

The task-arithmetic family (mergekit's GeneralizedTaskArithmeticMerge): sparsify each delta (sparsify.py),
multiply by its weight, then with TIES consensus ("sum": majority sign of the weighted sum, >= 0 counts as +)
keep only entries agreeing with it and, if normalize, divide by the sum of the agreeing weights (0 -> 1);
without consensus divide by sum(w) (|sum| < 1e-8 -> 1); times lambda; plus base.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vlmerge.errors import VlmergeError
from vlmerge.merge.sparsify import DeltaStats, prune, scale_rows_

DEFAULT_DENSITY = 1.0
DEFAULT_GAMMA = 0.01
DOT_THRESHOLD = 0.9995  # mergekit slerp: above this |cos| the endpoints count as colinear -> lerp
NORM_EPS = 1e-8  # mergekit slerp: a norm below this is taken as 1


@dataclass(frozen=True)
class OpArgs:
    """The parameters of one op call (per tensor): per-source tuples in source order, then shared values.

    `normalize` / `rescale` None = the op's mergekit default (see the table at the top of this module).
    """

    weight: tuple[float, ...] = ()
    density: tuple[float, ...] = ()
    gamma: tuple[float, ...] = ()
    t: float = 0.5
    normalize: bool | None = None
    rescale: bool | None = None
    lambda_: float = 1.0


@dataclass(frozen=True)
class OpSpec:
    """One registry entry: the function and what it reads, for callers that build OpArgs (genome, recipes)."""

    name: str
    fn: Callable[..., Tensor]
    per_source: tuple[str, ...]  # per-source parameters the op reads
    shared: tuple[str, ...]  # shared parameters the op reads
    needs_base: bool  # False: the result does not depend on the base (mergekit defines it without one)
    random: bool  # True: needs a generator (DARE)
    normalize: bool | None = None  # mergekit's default; None when the op has no such switch
    rescale: bool | None = None
    n_sources: int | None = None  # exactly this many sources (slerp: 2)
    sparsification: str | None = None  # sparsify.METHODS name
    consensus: bool = False  # TIES sign election

    @property
    def uses_stats(self) -> bool:
        """Whether `stats` (DeltaStats) speeds this op up: magnitude thresholds."""
        return self.sparsification in ("magnitude", "magnitude_outliers")


def _fail(op: str, what: str) -> None:
    raise VlmergeError(f"merge op {op!r}: {what}")


def check_args(op_name: str, args: OpArgs, n: int) -> None:
    """Refuse bad arguments for `n` sources, naming the parameter and its value (VlmergeError)."""
    spec = get_op(op_name)
    if n < 1:
        _fail(op_name, f"needs at least one source, got n = {n}")
    if spec.n_sources is not None and n != spec.n_sources:
        _fail(op_name, f"needs exactly {spec.n_sources} sources (x0 = target, x1 = donor), got n = {n}")
    for name in spec.per_source:
        values = getattr(args, name)
        if not isinstance(values, tuple):
            _fail(op_name, f"{name} must be a tuple of floats, got {values!r}")
        if name != "weight" and not values:
            continue
        if len(values) != n:
            _fail(op_name, f"{name} = {values} has {len(values)} values for {n} sources")
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                _fail(op_name, f"{name}[{i}] = {v!r} is not a finite number")
            if name == "density" and not 0 < v <= 1:
                _fail(op_name, f"density[{i}] = {v} is outside (0, 1]")
            if name == "gamma" and not 0 <= v < 1:
                _fail(op_name, f"gamma[{i}] = {v} is outside [0, 1)")
    for name in ("t", "lambda_"):
        v = getattr(args, name)
        if name in spec.shared and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
        ):
            _fail(op_name, f"{name} = {v!r} is not a finite number")
    for name in ("normalize", "rescale"):
        v = getattr(args, name)
        if name in spec.shared and v is not None and not isinstance(v, bool):
            _fail(op_name, f"{name} = {v!r} must be true, false or null (the op's default)")
    if spec.name == "linear" and _flag(args.normalize, spec.normalize) and math.fsum(args.weight) == 0:
        _fail(op_name, f"weight = {args.weight} sums to 0; normalize divides by that sum")


def _flag(value: bool | None, default: bool | None) -> bool:
    return bool(default) if value is None else value


def _prepare(op_name: str, base: Tensor, deltas: Tensor, p: OpArgs) -> int:
    if deltas.dim() == 0 or tuple(deltas.shape[1:]) != tuple(base.shape):
        raise VlmergeError(
            f"merge op {op_name!r}: deltas of shape {tuple(deltas.shape)} do not stack task vectors of the "
            f"base shape {tuple(base.shape)} (expected [n, {', '.join(map(str, base.shape))}])"
        )
    if deltas.dtype != base.dtype or deltas.device != base.device:
        raise VlmergeError(
            f"merge op {op_name!r}: deltas are {deltas.dtype} on {deltas.device} but the base is "
            f"{base.dtype} on {base.device}; pass both in the compute dtype, on one device"
        )
    check_args(op_name, p, deltas.shape[0])
    return deltas.shape[0]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an op computes in for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weights(p: OpArgs, like: Tensor) -> Tensor:
    return torch.tensor(p.weight, dtype=like.dtype, device=like.device)


def linear(base: Tensor, deltas: Tensor, p: OpArgs, *, generator: torch.Generator | None = None,
           stats: DeltaStats | None = None) -> Tensor:  # fmt: skip
    """sum(w_i x_i) [/ sum(w_i)], computed as one gemv over the task vectors plus the base."""
    n = _prepare("linear", base, deltas, p)
    total = math.fsum(p.weight)
    normalize = _flag(p.normalize, OPS["linear"].normalize)
    alpha, beta = (1.0 / total, 1.0) if normalize else (1.0, total)
    work = work_dtype(base.dtype)
    flat = torch.addmv(base.reshape(-1).to(work), deltas.reshape(n, -1).T.to(work), _weights(p, deltas.to(work)),
                       beta=beta, alpha=alpha)  # fmt: skip
    return flat.view(base.shape).to(base.dtype)


def task_arithmetic(base: Tensor, deltas: Tensor, p: OpArgs, *, generator: torch.Generator | None = None,
                    stats: DeltaStats | None = None) -> Tensor:  # fmt: skip
    """base + lambda * sum(w_i d_i) [/ sum(w_i)], one gemv."""
    n = _prepare("task_arithmetic", base, deltas, p)
    scale = p.lambda_ / _linear_divisor(p, OPS["task_arithmetic"])
    work = work_dtype(base.dtype)
    flat = torch.addmv(base.reshape(-1).to(work), deltas.reshape(n, -1).T.to(work), _weights(p, deltas.to(work)),
                       alpha=scale)  # fmt: skip
    return flat.view(base.shape).to(base.dtype)


def _linear_divisor(p: OpArgs, spec: OpSpec) -> float:
    if not _flag(p.normalize, spec.normalize):
        return 1.0
    total = math.fsum(p.weight)
    return 1.0 if abs(total) < 1e-8 else total


def _sparse_task_arithmetic(
    spec: OpSpec, base: Tensor, deltas: Tensor, p: OpArgs, generator: torch.Generator | None,
    stats: DeltaStats | None,
) -> Tensor:  # fmt: skip
    """The GTA family with sparsification (ties, dare_*, breadcrumbs*): see the module docstring."""
    n = _prepare(spec.name, base, deltas, p)
    if base.numel() == 0:
        return base.clone()
    out_dtype, work = base.dtype, work_dtype(base.dtype)
    base, deltas = base.to(work), deltas.to(work)
    kept, factors = prune(
        deltas,
        spec.sparsification,
        p.density or (DEFAULT_DENSITY,) * n,
        gamma=p.gamma or (DEFAULT_GAMMA,) * n,
        rescale=_flag(p.rescale, spec.rescale),
        generator=generator,
        stats=stats,
    )
    if not spec.consensus:  # one gemv: base + scale * sum_i (w_i * factor_i) kept_i
        coef = _weights(p, kept) if factors is None else _weights(p, kept) * factors
        scale = p.lambda_ / _linear_divisor(p, spec)
        return torch.addmv(base.reshape(-1), kept.T, coef, alpha=scale).view(base.shape).to(out_dtype)
    weighted = scale_rows_(kept, p.weight, factors).view(deltas.shape)
    agree = torch.where(weighted.sum(0) >= 0, weighted > 0, weighted < 0)
    mixed = weighted.mul_(agree).sum(0)
    if _flag(p.normalize, spec.normalize):
        divisor = torch.zeros_like(mixed)
        for i, w in enumerate(p.weight):
            divisor.add_(agree[i], alpha=w)
        mixed.div_(divisor.masked_fill_(divisor == 0, 1))
    if p.lambda_ != 1:
        mixed.mul_(p.lambda_)
    return mixed.add_(base).to(out_dtype)


def ties(base: Tensor, deltas: Tensor, p: OpArgs, *, generator: torch.Generator | None = None,
         stats: DeltaStats | None = None) -> Tensor:  # fmt: skip
    """TIES: magnitude top-k per source, sign election, disjoint mean (stats make the threshold O(1))."""
    return _sparse_task_arithmetic(OPS["ties"], base, deltas, p, generator, stats)


def dare_ties(base: Tensor, deltas: Tensor, p: OpArgs, *, generator: torch.Generator | None = None,
              stats: DeltaStats | None = None) -> Tensor:  # fmt: skip
    """DARE random drop (seeded by `generator`), then TIES sign election."""
    return _sparse_task_arithmetic(OPS["dare_ties"], base, deltas, p, generator, stats)


def dare_linear(base: Tensor, deltas: Tensor, p: OpArgs, *, generator: torch.Generator | None = None,
                stats: DeltaStats | None = None) -> Tensor:  # fmt: skip
    """DARE random drop (seeded by `generator`), then a weighted sum."""
    return _sparse_task_arithmetic(OPS["dare_linear"], base, deltas, p, generator, stats)


def breadcrumbs(base: Tensor, deltas: Tensor, p: OpArgs, *, generator: torch.Generator | None = None,
                stats: DeltaStats | None = None) -> Tensor:  # fmt: skip
    """Model breadcrumbs: drop the largest gamma and the smallest entries, then a weighted sum."""
    return _sparse_task_arithmetic(OPS["breadcrumbs"], base, deltas, p, generator, stats)


def breadcrumbs_ties(base: Tensor, deltas: Tensor, p: OpArgs, *, generator: torch.Generator | None = None,
                     stats: DeltaStats | None = None) -> Tensor:  # fmt: skip
    """Breadcrumbs pruning, then TIES sign election."""
    return _sparse_task_arithmetic(OPS["breadcrumbs_ties"], base, deltas, p, generator, stats)


def slerp(base: Tensor, deltas: Tensor, p: OpArgs, *, generator: torch.Generator | None = None,
          stats: DeltaStats | None = None) -> Tensor:  # fmt: skip
    """Spherical interpolation from x0 = base + deltas[0] (t = 0) to x1 = base + deltas[1] (t = 1)."""
    _prepare("slerp", base, deltas, p)
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    base_work = base.to(work)  # add in the working dtype, as mergekit receives x0 and x1 themselves
    x0 = torch.add(base_work, deltas[0]).reshape(-1)
    x1 = torch.add(base_work, deltas[1]).reshape(-1)
    norm0 = torch.linalg.vector_norm(x0)
    norm1 = torch.linalg.vector_norm(x1)
    norm0 = torch.where(norm0 > NORM_EPS, norm0, 1)
    norm1 = torch.where(norm1 > NORM_EPS, norm1, 1)
    dot = (torch.dot(x0, x1) / (norm0 * norm1)).clamp(-1, 1)
    colinear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(colinear, 0, dot))
    sin_theta = torch.sin(theta)
    t = p.t
    coef0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef1 = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return x0.mul_(coef0).addcmul_(x1, coef1).view(base.shape).to(base.dtype)


_GTA = ("normalize", "rescale", "lambda_")
# fmt: off
OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec("linear", linear, ("weight",), ("normalize",), needs_base=False, random=False, normalize=True),
        OpSpec("task_arithmetic", task_arithmetic, ("weight",), ("normalize", "lambda_"), needs_base=True,
               random=False, normalize=False),
        OpSpec("ties", ties, ("weight", "density"), _GTA, needs_base=True, random=False, normalize=True,
               rescale=False, sparsification="magnitude", consensus=True),
        OpSpec("dare_ties", dare_ties, ("weight", "density"), _GTA, needs_base=True, random=True,
               normalize=False, rescale=True, sparsification="random", consensus=True),
        OpSpec("dare_linear", dare_linear, ("weight", "density"), _GTA, needs_base=True, random=True,
               normalize=False, rescale=True, sparsification="random"),
        OpSpec("breadcrumbs", breadcrumbs, ("weight", "density", "gamma"), _GTA, needs_base=True,
               random=False, normalize=False, rescale=False, sparsification="magnitude_outliers"),
        OpSpec("breadcrumbs_ties", breadcrumbs_ties, ("weight", "density", "gamma"), _GTA, needs_base=True,
               random=False, normalize=False, rescale=False, sparsification="magnitude_outliers",
               consensus=True),
        OpSpec("slerp", slerp, (), ("t",), needs_base=False, random=False, n_sources=2),
    )
}
# fmt: on


def get_op(name: str) -> OpSpec:
    try:
        return OPS[name]
    except (KeyError, TypeError):
        raise VlmergeError(f"unknown merge op {name!r}; known ops: {', '.join(OPS)}") from None
