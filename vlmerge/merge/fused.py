"""One pass per tensor for the task-arithmetic family (every op but slerp): what the exporter and the search run.

ops.py is the reference; this computes the same formula without full-tensor temporaries, per element, in
float32 (float64 for float64 inputs), sources j = 0..n-1 in order, every sum accumulated from 0 in that order:

    keep_j = lo_j <= |d_j| <= hi_j  (magnitude: ranks in the sorted |d_j|)  or  draw_j(e) < density_j  (DARE)
    x_j = keep_j ? d_j * c_j : 0,   c_j = w_j (* factor_j: mergekit's L1 rescale, sums in float64)
    s = sum x_j,  P = sum (x_j > 0 ? x_j : 0),  Q = sum (x_j < 0 ? x_j : 0)
    TIES consensus: m = s >= 0 ? P : Q, divided (normalize) by the agreeing w_j's sum (0 -> 1); else m = s
    out = m * scale + base * beta,  rounded to the input dtype, then to the destination's

Masks enter as 0/1 factors (x * keep, P = sum x * (x > 0), m = P * e + Q * (1 - e) with e = (s >= 0)): no
data-dependent branches, which NumPy and torch run slowly on random masks. Separate IEEE multiplies, adds and a
correctly rounded divide (no fused multiply-add): the CPU code here (NumPy, chunked) and the GPU kernel
(fused_gpu.py) give the same tensors bit for bit; with rescale the float64 L1 sums are added in another order
and may differ in the last bit, very rarely. Against the reference: the same masks, values within float32
rounding (the reference sums through addmv and temporaries).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vlmerge.merge.ops import DEFAULT_DENSITY, DEFAULT_GAMMA, OpArgs, OpSpec, _flag, _prepare, work_dtype
from vlmerge.merge.sparsify import (
    L1_EPS,
    DeltaStats,
    _ascending_values,
    _check_stats,
    check_indexable,
    draws_numpy,
    source_keys,
)

CHUNK = 1 << 18  # elements per CPU step: temporaries stay in cache
SPARSIFY = {None: 0, "magnitude": 1, "magnitude_outliers": 1, "random": 2}


def supports(spec: OpSpec) -> bool:
    return spec.name != "slerp"


@dataclass(frozen=True)
class GtaCall:
    """Host scalars of one op over T tensors (one candidate): what the kernels read per tensor and source."""

    spec: OpSpec
    weight: np.ndarray  # [T, n] float64
    scale: np.ndarray  # [T]
    beta: np.ndarray  # [T]
    lo_rank: np.ndarray  # [T, n] int64: index into the ascending |d_j|, or -1 -> lo_value
    hi_rank: np.ndarray
    lo_value: np.ndarray  # [T, n] float64
    hi_value: np.ndarray
    keys: np.ndarray  # [T, n] int64: 32-bit DARE hash keys
    keep_below: np.ndarray  # [T, n] int64: 24-bit DARE thresholds
    dense: np.ndarray  # [T, n] bool: density >= 1 (never rescaled)
    normalize: bool
    rescale: bool

    @property
    def n(self) -> int:
        return self.weight.shape[1]

    def take(self, rows: Sequence[int]) -> GtaCall:
        index = np.asarray(rows, dtype=np.int64)
        pick = {k: v[index] if isinstance(v, np.ndarray) else v for k, v in vars(self).items()}
        return GtaCall(**pick)


def gta_call(spec: OpSpec, weight: np.ndarray, density: np.ndarray, gamma: np.ndarray, numel: np.ndarray, *,
             normalize: bool | None, rescale: bool | None, lambda_: float,
             seeds: Sequence[int] | None = None) -> GtaCall:  # fmt: skip
    """The scalars of `spec` for T tensors: per-source [T, n] arrays, `numel` [T], `seeds` [T] (DARE keys)."""
    t_count, n = weight.shape
    norm = _flag(normalize, spec.normalize)
    totals = np.array([math.fsum(row) for row in weight.tolist()], dtype=np.float64).reshape(t_count)
    ones = np.ones(t_count)
    if spec.name == "linear":
        scale, beta = (1.0 / totals, ones) if norm else (ones, totals)
    elif spec.consensus:
        scale, beta = ones * lambda_, ones
    else:
        divisor = np.where(np.abs(totals) < 1e-8, 1.0, totals) if norm else ones
        scale, beta = lambda_ / divisor, ones
    size = numel.astype(np.float64)[:, None]
    num = numel.astype(np.int64)[:, None]
    dense = density >= 1
    minus = np.full((t_count, n), -1, dtype=np.int64)
    lo_rank, hi_rank = minus, minus.copy()
    lo_value, hi_value = np.zeros((t_count, n)), np.full((t_count, n), np.inf)
    if spec.sparsification == "magnitude":
        lo_rank = np.where(dense, -1, num - np.maximum(1, np.floor(density * size).astype(np.int64)))
    elif spec.sparsification == "magnitude_outliers":
        target = np.floor(density * size).astype(np.int64)
        n_bot = np.maximum(0, num - target - np.floor(gamma * size).astype(np.int64))
        empty = ~dense & (target == 0)
        window = ~dense & ~empty
        lo_rank, hi_rank = np.where(window, n_bot, -1), np.where(window, n_bot + target - 1, -1)
        lo_value, hi_value = np.where(empty, np.inf, lo_value), np.where(empty, 0.0, hi_value)
    keys = np.zeros((t_count, n), dtype=np.int64)
    keep_below = np.zeros((t_count, n), dtype=np.int64)
    if spec.sparsification == "random":
        for i, seed in enumerate(seeds):
            keys[i] = source_keys(seed, n)
        keep_below = np.ceil(density.astype(np.float32).astype(np.float64) * 2**24).astype(np.int64)
    return GtaCall(spec, weight.astype(np.float64), scale, beta, lo_rank, hi_rank, lo_value, hi_value, keys,
                   keep_below, dense, norm, bool(spec.sparsification) and _flag(rescale, spec.rescale))  # fmt: skip


def call_for_args(spec: OpSpec, args: OpArgs, n: int, numel: int, seed: int | None) -> GtaCall:
    """GtaCall of one tensor from its resolved OpArgs (defaults filled as the reference fills them)."""

    def row(values: tuple[float, ...], default: float) -> np.ndarray:
        return np.array([values or (default,) * n], dtype=np.float64)

    return gta_call(spec, row(args.weight, 1.0), row(args.density, DEFAULT_DENSITY), row(args.gamma, DEFAULT_GAMMA),
                    np.array([numel]), normalize=args.normalize, rescale=args.rescale, lambda_=args.lambda_,
                    seeds=None if seed is None else [seed])  # fmt: skip


def merge_one(spec: OpSpec, base: Tensor, deltas: Tensor, args: OpArgs, *, seed: int | None = None,
              stats: DeltaStats | None = None, out: Tensor | None = None) -> Tensor:  # fmt: skip
    """The op's merged tensor (shape and dtype of `base`), or written into `out` (same shape, any float dtype).

    `seed`: the tensor's DARE key (`sparsify.tensor_key(recipe seed, name)`), needed by random ops.
    """
    n = _prepare(spec.name, base, deltas, args)
    if spec.random and seed is None:
        raise ValueError("random sparsification (DARE) needs the tensor's seed: sparsify.tensor_key(seed, name)")
    call = call_for_args(spec, args, n, base.numel(), seed)
    target = torch.empty_like(base) if out is None else out
    if base.numel() == 0:
        return target
    if base.device.type == "cuda":
        from vlmerge.merge.fused_gpu import TritonGroup, triton_ready

        if triton_ready():
            sorted_abs = None
            if spec.uses_stats:
                sorted_abs = _sorted_abs(deltas, stats)
            flat = target.view(-1) if target.is_contiguous() else torch.empty(base.numel(), dtype=target.dtype,
                                                                              device=base.device)  # fmt: skip
            TritonGroup([base.contiguous()], [deltas.contiguous()], [sorted_abs]).run(call, [flat])
            if flat.data_ptr() != target.data_ptr():
                target.copy_(flat.view(base.shape))
            return target
    merge_cpu(call, 0, base, deltas, target, stats)
    return target


def merge_cpu(call: GtaCall, row: int, base: Tensor, deltas: Tensor, out: Tensor,
              stats: DeltaStats | None = None) -> None:  # fmt: skip
    """Tensor `row` of `call` written into `out`, computed with NumPy on the CPU chunk by chunk (any device)."""
    n, numel = call.n, base.numel()
    work = work_dtype(base.dtype)
    np_work = np.float64 if work == torch.float64 else np.float32
    b_flat, d_flat = base.reshape(-1), deltas.reshape(n, -1)
    sparsify = SPARSIFY[call.spec.sparsification]
    windows = _windows(call, row, d_flat, stats) if sparsify == 1 else None
    if sparsify == 2:
        check_indexable(numel)

    def keep(j: int, a: np.ndarray, start: int, stop: int) -> np.ndarray | None:
        """Bool mask of source j on [start, stop); `a` = |d| there."""
        if sparsify == 1:
            lo, hi = windows[j]
            return (a >= lo) & (a <= hi) if math.isfinite(hi) else a >= lo
        if sparsify == 2:
            return draws_numpy(start, stop, int(call.keys[row, j])) < np.uint32(call.keep_below[row, j])
        return None

    w_work = [np_work(w) for w in call.weight[row]]
    coef = w_work
    if call.rescale:  # w * factor, both in the work dtype, one rounding
        coef = [w * np_work(f) for w, f in zip(w_work, _factors(call, row, d_flat, keep))]
    scale, beta = np_work(call.scale[row]), np_work(call.beta[row])
    one = np_work(1)
    out_flat = out.view(-1) if out.is_contiguous() else torch.empty(numel, dtype=out.dtype, device=out.device)
    x_buf, b_buf = np.empty(min(CHUNK, numel), dtype=np_work), np.empty(min(CHUNK, numel), dtype=np_work)
    for start in range(0, numel, CHUNK):
        stop = min(start + CHUNK, numel)
        s = np.zeros(stop - start, dtype=np_work)
        x = x_buf[: stop - start]
        pos, neg, w_pos, w_neg = (np.zeros_like(s) for _ in range(4)) if call.spec.consensus else (None,) * 4
        for j in range(n):
            d = _chunk(d_flat[j], start, stop, work)
            kept = keep(j, np.abs(d) if sparsify == 1 else None, start, stop)
            np.multiply(d, coef[j], out=x)
            if kept is not None:
                x *= kept
            s += x
            if call.spec.consensus:
                up, down = x > 0, x < 0
                pos += x * up
                neg += x * down
                if call.normalize:
                    w_pos += up * w_work[j]
                    w_neg += down * w_work[j]
        mixed = s
        if call.spec.consensus:  # elect the sign of s; masks as 0/1 factors, as the GPU kernel computes them
            elect = (s >= 0).astype(np_work)
            mixed = pos * elect + neg * (one - elect)
            if call.normalize:
                divisor = w_pos * elect + w_neg * (one - elect)
                mixed = mixed / (divisor + (divisor == 0))
        mixed *= scale
        mixed += np.multiply(_chunk(b_flat, start, stop, work), beta, out=b_buf[: stop - start])
        out_flat[start:stop] = torch.from_numpy(mixed).to(base.dtype)
    if not out.is_contiguous():
        out.copy_(out_flat.view(out.shape))


def _chunk(flat: Tensor, start: int, stop: int, work: torch.dtype) -> np.ndarray:
    return flat[start:stop].to(device="cpu", dtype=work).numpy()


def _round(value: float, work: torch.dtype) -> float:
    """`value` rounded to the work dtype (as the GPU kernel reads it from its float table)."""
    return float(np.float64(value).astype(np.float64 if work == torch.float64 else np.float32))


def _sorted_abs(deltas: Tensor, stats: DeltaStats | None) -> Tensor:
    """Ascending |d| per source, in the deltas' dtype, for the GPU kernel's magnitude ranks."""
    flat = deltas.reshape(deltas.shape[0], -1)
    if stats is None:
        return torch.sort(flat.abs(), dim=1).values
    _check_stats(stats, flat)
    return stats.sorted_abs.to(device=deltas.device, dtype=deltas.dtype).contiguous()


def _windows(call: GtaCall, row: int, d_flat: Tensor, stats: DeltaStats | None) -> list[tuple[float, float]]:
    """(lo, hi) per source: rank -> the value at that rank of the ascending |d_j| (stats: one index)."""
    out = []
    for j in range(call.n):
        ranks = [int(call.lo_rank[row, j]), int(call.hi_rank[row, j])]
        needed = [r for r in ranks if r >= 0]
        mags = None if stats is not None or not needed else d_flat[j:j + 1].to(work_dtype(d_flat.dtype)).abs()
        found = iter(_ascending_values(mags, 0, needed, None) if mags is not None else
                     [stats.sorted_abs[j, r] for r in needed])  # fmt: skip
        lo = float(next(found)) if ranks[0] >= 0 else float(call.lo_value[row, j])
        hi = float(next(found)) if ranks[1] >= 0 else float(call.hi_value[row, j])
        out.append((lo, hi))
    return out


def _factors(call: GtaCall, row: int, d_flat: Tensor, keep) -> list[float]:
    """mergekit's L1 rescale per source: sum |d| / sum |kept d| (float64 sums), 1 when skipped."""
    numel = d_flat.shape[1]
    factors = []
    for j in range(call.n):
        before = after = 0.0
        for start in range(0, numel, CHUNK):
            stop = min(start + CHUNK, numel)
            a = np.abs(_chunk(d_flat[j], start, stop, torch.float64))
            kept = keep(j, a, start, stop)
            before += float(a.sum())
            after += float(a.sum() if kept is None else (a * kept).sum())
        skip = before < L1_EPS or after < L1_EPS or bool(call.dense[row, j])
        factors.append(1.0 if skip else before / after)
    return factors
