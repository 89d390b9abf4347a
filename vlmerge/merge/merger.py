"""Apply a recipe to the tensors of a pool, one tower tensor at a time.

`merge_tensor` is the single definition of a merged tensor: the exporter streams it tensor by tensor, the
search runs the same computation on cached task vectors in memory (merge/fused.py, one pass per tensor). Same
inputs, same op, same DARE key from (recipe seed, tower name) -> the model a genome scored is bit-for-bit the
model exported.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from vlmerge.merge import fused
from vlmerge.merge.ops import DeltaStats, get_op
from vlmerge.merge.recipe import Recipe
from vlmerge.merge.sparsify import tensor_generator, tensor_key
from vlmerge.models.plan import TensorPlan
from vlmerge.models.pool import Pool


@dataclass(frozen=True)
class TensorInputs:
    """What a merge of one tensor reads: base and task vectors (shared vocabulary rows only)."""

    base: torch.Tensor
    deltas: torch.Tensor  # [n_sources, *shape]


def load_inputs(plan: TensorPlan, pool: Pool, *, device: str = "cpu",
                compute_dtype: torch.dtype = torch.float32) -> TensorInputs:  # fmt: skip
    """Base and task vectors; each source is read once and subtracted straight into its row of `deltas`."""
    rows = slice(None) if plan.rows is None else slice(0, plan.rows)

    def read(tower, key: str) -> torch.Tensor:
        return tower.checkpoint.get(key)[rows].to(device=device, dtype=compute_dtype)

    base = read(pool.base, plan.base_key)
    deltas = torch.empty((len(plan.source_keys), *base.shape), dtype=compute_dtype, device=device)
    for row, tower, key in zip(deltas, pool.sources, plan.source_keys):
        source = base if tower is pool.base and key == plan.base_key else read(tower, key)
        torch.sub(source, base, out=row)
    return TensorInputs(base=base, deltas=deltas)


def merge_tensor(plan: TensorPlan, inputs: TensorInputs, recipe: Recipe, *, stats: DeltaStats | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The merged values of one tensor; written into `out` (full target shape) when given.

    With vocabulary rows, only the shared rows are merged: `out` must already hold the target's values so that
    its extra rows stay as they are.
    """
    spec = get_op(recipe.op)
    args = recipe.args_for(plan.name, plan.layer, plan.kind)
    rows = slice(None) if plan.rows is None else slice(0, plan.rows)
    if fused.supports(spec):  # the one-pass formula, written straight into `out`
        seed = tensor_key(recipe.seed, plan.name) if spec.random else None
        target = None if out is None else out[rows]
        merged = fused.merge_one(spec, inputs.base, inputs.deltas, args, seed=seed, stats=stats, out=target)
        return merged if out is None else out
    generator = tensor_generator(recipe.seed, plan.name, inputs.base.device) if spec.random else None
    merged = spec.fn(inputs.base, inputs.deltas, args, generator=generator, stats=stats)
    if out is None:
        return merged
    out[rows].copy_(merged)
    return out


def merged_tensors(pool: Pool, recipe: Recipe, *, device: str = "cpu", compute_dtype: torch.dtype = torch.float32,
                   out_dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """(target checkpoint name, merged tensor) for every merged tower tensor, one at a time."""
    check_sources(pool, recipe)
    checkpoint = pool.target.checkpoint
    for plan in pool.plan.tensors:
        inputs = load_inputs(plan, pool, device=device, compute_dtype=compute_dtype)
        if plan.rows is None:
            merged = merge_tensor(plan, inputs, recipe)
        else:  # the target's extra vocabulary rows stay as they are
            full = checkpoint.get(plan.target_key).to(device=device, dtype=compute_dtype, copy=True)
            merged = merge_tensor(plan, inputs, recipe, out=full)
        del inputs
        yield plan.target_key, merged.to(device="cpu", dtype=out_dtype or checkpoint.dtype(plan.target_key))


def check_sources(pool: Pool, recipe: Recipe, where: str = "recipe") -> None:
    """Whether a recipe fits a pool, before any merge: its sources are the pool's, in order, and every rule
    selects a tensor of the target tower (`Recipe.check_selects`; what that means is in vlmerge.merge.recipe).
    `where` names the recipe (its file) in the sources message; rules name their own place."""
    from vlmerge.errors import VlmergeError

    if tuple(recipe.sources) != tuple(pool.source_names):
        raise VlmergeError(
            f"{where} sources {list(recipe.sources)} do not match the pool's sources {list(pool.source_names)} "
            "(the target first, then the donors in pool order)"
        )
    recipe.check_selects(pool.target.names)
