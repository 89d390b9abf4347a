"""Candidates merged in memory: the target model stays loaded and each recipe is written into it in place.

Task vectors (and, for magnitude pruning, their sorted magnitudes) are read once and cached on the model's
device; a candidate then costs one pass of the op over the cache, nothing goes to disk, and no parameter is
re-allocated. `merge_tensor` is the same function the exporter uses, so what the search scores is what it
exports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmerge.errors import VlmergeError
from vlmerge.merge.merger import TensorInputs, load_inputs, merge_tensor
from vlmerge.merge.ops import OPS, get_op
from vlmerge.merge.recipe import Recipe
from vlmerge.merge.sparsify import DeltaStats, delta_stats
from vlmerge.models.plan import TensorPlan
from vlmerge.models.pool import Pool

# ops whose pruning threshold is read from precomputed sorted magnitudes
MAGNITUDE_OPS = tuple(n for n, s in OPS.items() if s.sparsification in ("magnitude", "magnitude_outliers"))


def tower_root(model: torch.nn.Module, pool: Pool) -> torch.nn.Module:
    """The module whose parameter names the target's tower spec spells (a composite's language model)."""
    subdir = pool.target.spec.subdir
    return getattr(model, subdir) if subdir else model


def tower_parameters(model: torch.nn.Module, pool: Pool) -> dict[str, torch.nn.Parameter]:
    """Tower name -> the loaded model's parameter (in-memory spelling, transformers 4 or 5)."""
    spec = pool.target.spec
    params = {}
    for name, param in tower_root(model, pool).named_parameters():
        tower_name = spec.tower_name(name)
        if tower_name is not None:
            params[tower_name] = param
    missing = [p.name for p in pool.plan.tensors if p.name not in params]
    if missing:
        raise VlmergeError(f"the loaded target model has no parameters for tower tensors {missing[:8]}")
    return params


@dataclass
class ResidentTensor:
    """One tower tensor of the resident model: its plan, parameter, cached inputs and pruning statistics."""

    plan: TensorPlan
    param: torch.nn.Parameter
    inputs: TensorInputs
    stats: DeltaStats | None


def cache_tensor(plan: TensorPlan, param: torch.nn.Parameter, inputs: TensorInputs, ops: tuple[str, ...]):
    stats = delta_stats(inputs.deltas) if any(op in MAGNITUDE_OPS for op in ops) else None
    return ResidentTensor(plan, param, inputs, stats)


class ResidentMerger:
    """Writes recipes into a loaded target model, from task vectors cached on its device."""

    def __init__(self, entries: list[ResidentTensor], source_names: tuple[str, ...], pool: Pool | None = None):
        self.entries = entries
        self.source_names = tuple(source_names)
        self.pool = pool

    @classmethod
    def for_model(cls, model: torch.nn.Module, pool: Pool, *, cache_dtype: torch.dtype | None = None,
                  ops: tuple[str, ...] = ()) -> ResidentMerger:  # fmt: skip
        """Cache the pool's task vectors on the device of `model`'s tower parameters.

        `ops`: the ops this merger will be asked for (magnitude statistics are precomputed when one prunes).
        """
        params = tower_parameters(model, pool)
        entries = []
        for plan in pool.plan.tensors:
            param = params[plan.name]
            inputs = load_inputs(plan, pool, device=str(param.device), compute_dtype=cache_dtype or param.dtype)
            entries.append(cache_tensor(plan, param, inputs, ops))
        return cls(entries, pool.source_names, pool)

    @torch.no_grad()
    def apply(self, recipe: Recipe) -> None:
        """Write the recipe's merged tower into the model (in place)."""
        if tuple(recipe.sources) != self.source_names:
            raise VlmergeError(
                f"recipe sources {list(recipe.sources)} do not match the pool's sources {list(self.source_names)}"
            )
        spec = get_op(recipe.op)
        for entry in self.entries:
            stats = entry.stats if spec.name in MAGNITUDE_OPS else None
            merged = merge_tensor(entry.plan, entry.inputs, recipe, stats=stats)
            rows = slice(None) if entry.plan.rows is None else slice(0, entry.plan.rows)
            entry.param.data[rows].copy_(merged)

    @torch.no_grad()
    def load_source(self, role: str) -> None:
        """Write one source's own tower tensors (read from its checkpoint) into the model, unmerged.

        For the target this restores it exactly; for a text donor in a VLM it is the *tower swap*: the donor's
        tower with the target's vision encoder and projector (and the target's extra vocabulary rows).
        """
        roles = list(self.source_names)
        if role not in roles:
            raise VlmergeError(f"unknown source {role!r}; the pool's sources are {roles}")
        tower = self.pool.sources[roles.index(role)]
        for entry in self.entries:
            key = entry.plan.source_keys[roles.index(role)]
            rows = slice(None) if entry.plan.rows is None else slice(0, entry.plan.rows)
            entry.param.data[rows].copy_(tower.checkpoint.get(key)[rows])

    def cached_bytes(self) -> int:
        total = 0
        for entry in self.entries:
            tensors = [entry.inputs.base, entry.inputs.deltas]
            if entry.stats is not None:
                tensors.append(entry.stats.sorted_abs)
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total


def tower_state(model: torch.nn.Module, pool: Pool) -> dict[str, torch.Tensor]:
    """The model's current tower tensors by target checkpoint name (for exporting what was scored)."""
    params = tower_parameters(model, pool)
    return {plan.target_key: params[plan.name].detach() for plan in pool.plan.tensors}
