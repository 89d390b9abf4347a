"""Per-source sparsification of stacked task vectors, with the meaning of mergekit 0.1.5's `sparsify`.

Methods (mergekit's names): `magnitude` (TIES: keep the k = max(1, int(density * numel)) largest |delta|),
`random` (DARE: keep each entry with probability density) and `magnitude_outliers` (breadcrumbs: drop the
int(gamma * numel) largest |delta| and the smallest ones, keep int(density * numel)). `rescale` is mergekit's:
the kept entries are scaled so that each source's L1 norm is what it was before pruning (skipped when either
norm is < 1e-7, and for a source with density >= 1, which mergekit returns untouched). Note this is *not* DARE's
textbook 1/density factor; mergekit 0.1.5 matches the L1 norm for every method.

Magnitude pruning is a threshold, not an argsort: keep |d| >= (k-th largest |d|). The threshold is one index
into `DeltaStats.sorted_abs` when the caller precomputed it (once per tensor, reused by every search
candidate), else one `torch.kthvalue`; both return the same element, so the results are bit-identical.
Tie handling differs from mergekit's argsort only when several entries share the boundary magnitude: the
threshold keeps all of them (slightly more than k entries), argsort keeps an arbitrary k. With float32 task
vectors this practically never happens; with bf16 ones it keeps one more quantisation bucket.

DARE masks are `torch.rand(...) < density` drawn from a caller-seeded generator (see `tensor_generator`), in
float32 whatever the compute dtype, so one seed gives one mask; masks are nested across densities (a higher
density keeps a superset), which keeps the search's objective smooth in density. Masks depend on the
generator's device type (a CUDA stream differs from the CPU one).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vlmerge.errors import VlmergeError

METHODS = ("magnitude", "random", "magnitude_outliers")
L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor eps


@dataclass(frozen=True)
class DeltaStats:
    """Per-source ascending-sorted |delta| of one tensor's task vectors, `sorted_abs: [n, numel]`.

    Computed once per tensor (`delta_stats`) so that each search candidate finds its pruning thresholds by
    indexing instead of a selection over the whole tensor. Must come from the very `deltas` the op receives.
    """

    sorted_abs: Tensor


def delta_stats(deltas: Tensor) -> DeltaStats:
    return DeltaStats(torch.sort(deltas.reshape(deltas.shape[0], -1).abs(), dim=1).values)


def tensor_generator(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (run seed, tensor name) by sha256: stable across processes and Python runs."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "big") >> 1)
    return generator


def _check_stats(stats: DeltaStats, mags: Tensor) -> None:
    if tuple(stats.sorted_abs.shape) != tuple(mags.shape):
        raise VlmergeError(
            f"DeltaStats.sorted_abs has shape {tuple(stats.sorted_abs.shape)} but the task vectors flatten to "
            f"{tuple(mags.shape)}: stats must be computed from the same deltas"
        )


def _ascending_value(mags: Tensor, row: int, index: int, stats: DeltaStats | None) -> Tensor:
    """The `index`-th smallest |delta| (0-based) of one source, as a 0-d tensor on the device (no sync)."""
    if stats is not None:
        return stats.sorted_abs[row, index]
    return torch.kthvalue(mags[row], index + 1).values


def magnitude_mask(mags: Tensor, density: Sequence[float], stats: DeltaStats | None = None) -> Tensor:
    """Bool [n, N]: per source, |d| >= its k-th largest |d|, k = max(1, int(density * N)); all for density >= 1."""
    numel = mags.shape[1]
    if stats is not None:
        _check_stats(stats, mags)
    zero = mags.new_zeros(())
    thresholds = [
        zero if d >= 1 else _ascending_value(mags, i, numel - max(1, int(d * numel)), stats)
        for i, d in enumerate(density)
    ]
    return mags >= torch.stack(thresholds)[:, None]


def outlier_mask(mags: Tensor, density: Sequence[float], gamma: Sequence[float],
                 stats: DeltaStats | None = None) -> Tensor:  # fmt: skip
    """Bool [n, N]: per source, the |d| ranked [n_bot, n_bot + int(density * N)) ascending (mergekit's breadcrumbs).

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
            lows.append(_ascending_value(mags, i, n_bot, stats))
            highs.append(_ascending_value(mags, i, n_bot + target - 1, stats))
    return (mags >= torch.stack(lows)[:, None]) & (mags <= torch.stack(highs)[:, None])


def random_mask(shape: tuple[int, int], density: Sequence[float], generator: torch.Generator | None,
                device: torch.device) -> Tensor:  # fmt: skip
    """Bool [n, N]: entry kept when its uniform draw < the source's density (float32 draws, seeded)."""
    if generator is None:
        raise ValueError(
            "random sparsification (DARE) needs a generator: pass tensor_generator(seed, name, device)"
        )
    draws = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return draws < torch.tensor(density, dtype=torch.float32, device=device)[:, None]


def sparsify(deltas: Tensor, method: str, density: Sequence[float], *, gamma: Sequence[float] = (),
             rescale: bool = False, coef: Sequence[float] | None = None, generator: torch.Generator | None = None,
             stats: DeltaStats | None = None) -> Tensor:  # fmt: skip
    """Pruned task vectors [n, *S] (a new tensor), source i also multiplied by coef[i] when given.

    `coef` lets an op fold its weights into the same pass as the rescale (mergekit multiplies afterwards:
    equal up to float rounding). `deltas` is never modified.
    """
    if method not in METHODS:
        raise VlmergeError(f"unknown sparsification method {method!r}; known: {list(METHODS)}")
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1)
    if method == "random":
        keep = random_mask(tuple(flat.shape), density, generator, flat.device)
        mags = None
    else:
        mags = flat.abs()
        keep = (
            magnitude_mask(mags, density, stats)
            if method == "magnitude"
            else outlier_mask(mags, density, gamma, stats)
        )
    kept = flat * keep
    factor = torch.tensor([1.0] * n if coef is None else list(coef), dtype=flat.dtype, device=flat.device)
    if rescale:
        before = mags.sum(1) if mags is not None else torch.linalg.vector_norm(flat, 1, dim=1)
        after = torch.linalg.vector_norm(kept, 1, dim=1)
        dense = torch.tensor([d >= 1 for d in density], device=flat.device)
        skip = (before < L1_EPS) | (after < L1_EPS) | dense
        factor = factor * torch.where(skip, 1.0, before / after)
    elif coef is None:
        return kept.view(deltas.shape)
    return kept.mul_(factor[:, None]).view(deltas.shape)
