"""Per-source sparsification of stacked task vectors, with the meaning of mergekit 0.1.5's `sparsify`.

Methods (mergekit's names): `magnitude` (TIES: keep the k = max(1, int(density * numel)) largest |delta|),
`random` (DARE: keep each entry with probability density) and `magnitude_outliers` (breadcrumbs: drop the
int(gamma * numel) largest |delta| and the smallest ones, keep int(density * numel)). `rescale` is mergekit's:
the kept entries are scaled so that each source's L1 norm is what it was before pruning (skipped when either
norm is < 1e-7, and for a source with density >= 1, which mergekit returns untouched); the norms are summed in
float64. Note this is *not*
DARE's textbook 1/density factor; mergekit 0.1.5 matches the L1 norm for every method.

Magnitude pruning is a threshold, not an argsort: keep |d| >= (k-th largest |d|). The threshold is one index
into `DeltaStats.sorted_abs` when the caller precomputed it (once per tensor, reused by every search
candidate), else one selection (kthvalue on CPU, a sort on GPU); all return the same element, so the results
are bit-identical. On an H200, TIES over three 4096x14336 float32 task vectors took 5 ms with stats, 13 ms
without, and `delta_stats` 8 ms (measured 2026-11).
Tie handling differs from mergekit's argsort only when several entries share the boundary magnitude: the
threshold keeps all of them (slightly more than k entries), argsort keeps an arbitrary k. With float32 task
vectors this practically never happens; with bf16 ones it keeps one more quantisation bucket.

DARE masks are counter-based: source j of a tensor keeps element e when the 24 high bits of
lowbias32(e ^ key_j) (Wellons' 32-bit integer hash), read as a uniform in [0, 1), are below the source's density
(in float32). key_j comes from (run seed, tensor name, j) by sha256 (see `tensor_key`, `source_keys`). No random
stream: the mask is a pure function of the element index, identical on every device and in every kernel
(NumPy on CPU, torch integer ops elsewhere, the fused GPU kernel), and masks are nested across densities (a
higher density keeps a superset), which keeps the search's objective smooth in density. Element indices are
32-bit: a tensor with 2**32 or more entries is refused.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from vlmerge.errors import VlmergeError

METHODS = ("magnitude", "random", "magnitude_outliers")
L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor eps
HASH_MUL = (0x7FEB352D, 0x846CA68B)  # lowbias32's multipliers
MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class DeltaStats:
    """Per-source ascending-sorted |delta| of one tensor's task vectors, `sorted_abs: [n, numel]`.

    Computed once per tensor (`delta_stats`) so that each search candidate finds its pruning thresholds by
    indexing instead of a selection over the whole tensor. Must come from the very `deltas` the op receives.
    """

    sorted_abs: Tensor


def delta_stats(deltas: Tensor) -> DeltaStats:
    return DeltaStats(torch.sort(deltas.reshape(deltas.shape[0], -1).abs(), dim=1).values)


@lru_cache(maxsize=1 << 16)
def tensor_key(seed: int, name: str) -> int:
    """The 63-bit seed of (run seed, tensor name), by sha256: stable across processes and Python runs."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") >> 1


def tensor_generator(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with `tensor_key(seed, name)`; DARE reads only its seed (the masks are hashes)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(tensor_key(seed, name))
    return generator


@lru_cache(maxsize=1 << 16)
def source_keys(key: int, n: int) -> tuple[int, ...]:
    """32-bit hash keys of the n sources of one tensor whose key (or generator seed) is `key`."""
    return tuple(int.from_bytes(hashlib.sha256(f"{key}:{j}".encode()).digest()[:4], "big") for j in range(n))


def keep_threshold(density: float) -> int:
    """Entries whose 24-bit draw is below this are kept: draw / 2**24 < float32(density)."""
    return math.ceil(float(np.float32(density)) * 2**24)


def check_indexable(numel: int) -> None:
    if numel >= 2**32:
        raise VlmergeError(f"random sparsification indexes elements with 32 bits; a tensor has {numel} entries")


def draws_numpy(start: int, stop: int, key: int) -> np.ndarray:
    """24-bit draws (uint32) of element indices [start, stop) under one 32-bit source key."""
    x = np.arange(start, stop, dtype=np.uint32)
    x ^= np.uint32(key)
    x ^= x >> np.uint32(16)
    x *= np.uint32(HASH_MUL[0])
    x ^= x >> np.uint32(15)
    x *= np.uint32(HASH_MUL[1])
    x ^= x >> np.uint32(16)
    return x >> np.uint32(8)


def draws_torch(start: int, stop: int, key: int, device: torch.device | str) -> Tensor:
    """`draws_numpy` with torch integer ops (int64 holding uint32 values) on any device."""
    x = torch.arange(start, stop, dtype=torch.int64, device=device) ^ key
    x = x ^ (x >> 16)
    x = (x * HASH_MUL[0]) & MASK32
    x = x ^ (x >> 15)
    x = (x * (HASH_MUL[1] - 2**32)) & MASK32  # a multiplier above 2**31 as its negative: no int64 overflow
    return (x ^ (x >> 16)) >> 8


def hash_draws(start: int, stop: int, key: int, device: torch.device | str = "cpu") -> Tensor:
    """The draws as an int64 tensor on `device` (NumPy on CPU)."""
    if torch.device(device).type == "cpu":
        return torch.from_numpy(draws_numpy(start, stop, key).astype(np.int64))
    return draws_torch(start, stop, key, device)


def _check_stats(stats: DeltaStats, mags: Tensor) -> None:
    if tuple(stats.sorted_abs.shape) != tuple(mags.shape):
        raise VlmergeError(
            f"DeltaStats.sorted_abs has shape {tuple(stats.sorted_abs.shape)} but the task vectors flatten "
            f"to {tuple(mags.shape)}: stats must be computed from the same deltas"
        )


def _ascending_values(mags: Tensor, row: int, ranks: Sequence[int], stats: DeltaStats | None) -> list[Tensor]:
    """Given 0-based ranks of one source's ascending |delta|, as 0-d device tensors (no host sync).

    With stats: an index. Without: kthvalue on CPU (linear time), one sort elsewhere (on an H200, CUDA's
    kthvalue took 412 ms on 58.7M entries, its sort 2.6 ms). All return the same element.
    """
    if stats is not None:
        return [stats.sorted_abs[row, r].to(mags.dtype) for r in ranks]
    if mags.device.type == "cpu":
        return [torch.kthvalue(mags[row], r + 1).values for r in ranks]
    ordered = torch.sort(mags[row]).values
    return [ordered[r] for r in ranks]


def magnitude_mask(mags: Tensor, density: Sequence[float], stats: DeltaStats | None = None) -> Tensor:
    """Bool [n, N]: per source |d| >= its k-th largest |d|, k = max(1, int(density * N)) (all at 1)."""
    numel = mags.shape[1]
    if stats is not None:
        _check_stats(stats, mags)
    zero = mags.new_zeros(())
    thresholds = [
        zero if d >= 1 else _ascending_values(mags, i, [numel - max(1, int(d * numel))], stats)[0]
        for i, d in enumerate(density)
    ]
    return mags >= torch.stack(thresholds)[:, None]


def outlier_mask(mags: Tensor, density: Sequence[float], gamma: Sequence[float],
                 stats: DeltaStats | None = None) -> Tensor:  # fmt: skip
    """Bool [n, N]: per source, the |d| ranked [n_bot, n_bot + int(density * N)) ascending (breadcrumbs).

    n_bot = max(0, N - int(density * N) - int(gamma * N)): the gamma largest are dropped as outliers, reduced
    when density + gamma > 1. Two thresholds per source: lo <= |d| <= hi.
    """
    numel = mags.shape[1]
    if stats is not None:
        _check_stats(stats, mags)
    lows, highs = [], []
    for i, (d, g) in enumerate(zip(density, gamma)):
        target = int(d * numel)
        n_bot = max(0, numel - target - int(g * numel))
        if d >= 1:
            lows.append(mags.new_zeros(()))
            highs.append(mags.new_tensor(float("inf")))
        elif target == 0:
            lows.append(mags.new_tensor(float("inf")))
            highs.append(mags.new_zeros(()))
        else:
            low, high = _ascending_values(mags, i, [n_bot, n_bot + target - 1], stats)
            lows.append(low)
            highs.append(high)
    return (mags >= torch.stack(lows)[:, None]) & (mags <= torch.stack(highs)[:, None])


def random_mask(shape: tuple[int, int], density: Sequence[float], generator: torch.Generator | None,
                device: torch.device) -> Tensor:  # fmt: skip
    """Bool [n, N]: entry kept when its hashed draw < the source's density (keys from the generator's seed)."""
    if generator is None:
        raise ValueError(
            "random sparsification (DARE) needs a generator: pass tensor_generator(seed, name, device)"
        )
    n, numel = shape
    check_indexable(numel)
    keys = source_keys(generator.initial_seed(), n)
    rows = [hash_draws(0, numel, keys[j], device) < keep_threshold(density[j]) for j in range(n)]
    return torch.stack(rows).to(device) if rows else torch.zeros(shape, dtype=torch.bool, device=device)


def prune(deltas: Tensor, method: str, density: Sequence[float], *, gamma: Sequence[float] = (),
          rescale: bool = False, generator: torch.Generator | None = None,
          stats: DeltaStats | None = None) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """(kept [n, N], L1 factors [n] or None): the flattened pruned task vectors, a new tensor, and the
    per-source factors that `rescale` asks for, left unapplied so that an op can fold them into its weights.
    """
    if method not in METHODS:
        raise VlmergeError(f"unknown sparsification method {method!r}; known: {list(METHODS)}")
    flat = deltas.reshape(deltas.shape[0], -1)
    if method == "random":
        keep = random_mask(tuple(flat.shape), density, generator, flat.device)
        mags = None
    elif method == "magnitude":
        mags = flat.abs()
        keep = magnitude_mask(mags, density, stats)
    else:
        mags = flat.abs()
        keep = outlier_mask(mags, density, gamma, stats)
    kept = flat * keep
    if not rescale:
        return kept, None
    # float64 sums: float32 ones (vector_norm's) drift by ~0.1% over tens of millions of entries
    before = (mags if mags is not None else flat.abs()).sum(1, dtype=torch.float64)
    after = kept.abs().sum(1, dtype=torch.float64)
    skip = (before < L1_EPS) | (after < L1_EPS) | torch.tensor([d >= 1 for d in density], device=flat.device)
    return kept, torch.where(skip, 1.0, before / after).to(flat.dtype)


def scale_rows_(kept: Tensor, coef: Sequence[float], factors: Tensor | None = None) -> Tensor:
    """kept[i] *= coef[i] (* factors[i]) in place; Python-float rows when there are no device factors."""
    if factors is None:
        for row, c in zip(kept, coef):
            if c != 1:
                row.mul_(c)
        return kept
    return kept.mul_((factors * torch.tensor(list(coef), dtype=kept.dtype, device=kept.device))[:, None])


def sparsify(deltas: Tensor, method: str, density: Sequence[float], *, gamma: Sequence[float] = (),
             rescale: bool = False, generator: torch.Generator | None = None,
             stats: DeltaStats | None = None) -> Tensor:  # fmt: skip
    """mergekit's sparsify for each source: pruned (and rescaled) task vectors [n, *S], a new tensor."""
    kept, factors = prune(
        deltas, method, density, gamma=gamma, rescale=rescale, generator=generator, stats=stats
    )
    if factors is not None:
        kept.mul_(factors[:, None])
    return kept.view(deltas.shape)
