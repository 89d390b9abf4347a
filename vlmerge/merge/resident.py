"""Candidates merged in memory: the target model stays loaded and each recipe is written into it in place.

Task vectors (and, for magnitude pruning, their sorted magnitudes) are read once and cached on the model's
device; a candidate then costs one pass of the op over the cache, nothing goes to disk, and no parameter is
re-allocated. The merged values are written straight into the parameters: on CUDA by one fused kernel launch for
the whole tower (fused_gpu.py), elsewhere tensor by tensor (fused.merge_cpu) - the computation `merge_tensor`
runs for the exporter, so what the search scores is what it exports. A recipe's per-tensor arguments are
resolved for all tensors at once (`RuleTable`), equal to `Recipe.args_for` tensor by tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlmerge.errors import VlmergeError
from vlmerge.merge import fused
from vlmerge.merge.merger import TensorInputs, load_inputs, merge_tensor
from vlmerge.merge.ops import OPS, check_args, get_op
from vlmerge.merge.recipe import DEFAULTS, SOURCE_PARAMS, Recipe
from vlmerge.merge.sparsify import DeltaStats, delta_stats, tensor_key
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
        self._numel = np.array([e.inputs.base.numel() for e in entries], dtype=np.int64)
        self._rules: RuleTable | None = None
        self._plans: dict[bool, tuple] = {}
        self._out_pointers: list[int] | None = None
        self._out_views: list[torch.Tensor] = []

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
        if not fused.supports(spec):
            for entry in self.entries:
                merge_tensor(entry.plan, entry.inputs, recipe, stats=entry.stats, out=entry.param.data)
            return
        if not self.entries:
            return
        call = self._call(spec, recipe)
        groups, rest = self._launch_plan(spec.uses_stats)
        outs = self._outs()
        for group, rows in groups:
            group.run(call.take(rows), [outs[i] for i in rows])
        for i in rest:
            entry = self.entries[i]
            stats = entry.stats if spec.uses_stats else None
            fused.merge_cpu(call, i, entry.inputs.base, entry.inputs.deltas, outs[i], stats)

    def _call(self, spec, recipe: Recipe) -> fused.GtaCall:
        """The op's scalars for every tensor, checked as `check_args` checks one tensor's arguments."""
        if self._rules is None:
            self._rules = RuleTable([e.plan for e in self.entries])
        values = self._rules.resolve(recipe)
        n = len(self.source_names)
        first = self.entries[0].plan
        check_args(spec.name, recipe.args_for(first.name, first.layer, first.kind), n)
        bad = ~np.isfinite(values["weight"]).all(1)
        if "density" in spec.per_source:
            bad |= ~((values["density"] > 0) & (values["density"] <= 1)).all(1)
        if "gamma" in spec.per_source:
            bad |= ~((values["gamma"] >= 0) & (values["gamma"] < 1)).all(1)
        if spec.name == "linear":
            bad |= values["weight"].sum(1) == 0
        for i in np.flatnonzero(bad):
            plan = self.entries[i].plan
            check_args(spec.name, recipe.args_for(plan.name, plan.layer, plan.kind), n)
        seeds = [tensor_key(recipe.seed, e.plan.name) for e in self.entries] if spec.random else None
        return fused.gta_call(spec, values["weight"], values["density"], values["gamma"], self._numel,
                              normalize=recipe.normalize, rescale=recipe.rescale, lambda_=recipe.lambda_,
                              seeds=seeds)  # fmt: skip

    def _outs(self) -> list[torch.Tensor]:
        """Each parameter's merged rows, flat (views, rebuilt when a parameter's storage changed)."""
        pointers = [e.param.data_ptr() for e in self.entries]
        if pointers != self._out_pointers:
            self._out_views = [_rows(e).view(-1) if _rows(e).is_contiguous() else _rows(e) for e in self.entries]
            self._out_pointers = pointers
        return self._out_views

    def _launch_plan(self, needs_stats: bool):
        """([(TritonGroup, entry rows)], rows merged one by one): CUDA entries grouped by device and dtypes."""
        if needs_stats in self._plans:
            return self._plans[needs_stats]
        from vlmerge.merge.fused_gpu import TritonGroup, triton_ready

        keyed: dict[tuple, list[int]] = {}
        rest = []
        for i, entry in enumerate(self.entries):
            base, deltas, rows = entry.inputs.base, entry.inputs.deltas, _rows(entry)
            ok = (base.device.type == "cuda" and triton_ready() and base.numel() > 0
                  and base.is_contiguous() and deltas.is_contiguous() and rows.is_contiguous()
                  and deltas.dtype == base.dtype and (not needs_stats or entry.stats is not None))  # fmt: skip
            if ok and needs_stats:
                ok = entry.stats.sorted_abs.dtype == base.dtype and entry.stats.sorted_abs.is_contiguous()
            if ok:
                keyed.setdefault((base.device, base.dtype, rows.dtype), []).append(i)
            else:
                rest.append(i)
        groups = []
        for rows in keyed.values():
            picked = [self.entries[i] for i in rows]
            sorted_abs = [e.stats.sorted_abs if needs_stats else None for e in picked]
            group = TritonGroup([e.inputs.base for e in picked], [e.inputs.deltas for e in picked], sorted_abs)
            groups.append((group, rows))
        self._plans[needs_stats] = (groups, rest)
        return groups, rest

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


def _rows(entry: ResidentTensor) -> torch.Tensor:
    data = entry.param.data
    return data if entry.plan.rows is None else data[: entry.plan.rows]


class RuleTable:
    """Per-source parameters of every tensor for a recipe: `Recipe.args_for`'s values, as [T, n] arrays.

    Which rule sets a tensor's value depends only on the rules' selectors and keys, the same for every candidate
    of one genome: that index is built once per rule structure, and a candidate is one gather per parameter.
    """

    def __init__(self, plans: list[TensorPlan]):
        self.plans = plans
        self._index: dict[tuple, dict[str, np.ndarray]] = {}

    def resolve(self, recipe: Recipe) -> dict[str, np.ndarray]:
        key = (recipe.sources, tuple((r.source, r.layers, r.kind, r.match, tuple(r.values)) for r in recipe.rules))
        index = self._index.get(key)
        if index is None:
            if len(self._index) >= 32:
                self._index.clear()
            index = self._index[key] = self._build(recipe)
        return {
            p: np.array([r.values.get(p, np.nan) for r in recipe.rules] + [DEFAULTS[p]], dtype=np.float64)[index[p]]
            for p in SOURCE_PARAMS
        }

    def _build(self, recipe: Recipe) -> dict[str, np.ndarray]:
        """Per parameter, [T, n] index of the last rule setting it for that tensor and source (-1: default)."""
        n = len(recipe.sources)
        index = {p: np.full((len(self.plans), n), -1, dtype=np.int64) for p in SOURCE_PARAMS}
        for r, rule in enumerate(recipe.rules):
            tensors = [i for i, p in enumerate(self.plans) if rule.selects(p.name, p.layer, p.kind)]
            columns = range(n) if rule.source is None else [recipe.sources.index(rule.source)]
            for param in rule.values:
                if param in index and tensors:
                    index[param][np.ix_(tensors, list(columns))] = r
        return index


def tower_state(model: torch.nn.Module, pool: Pool) -> dict[str, torch.Tensor]:
    """The model's current tower tensors by target checkpoint name (for exporting what was scored)."""
    params = tower_parameters(model, pool)
    return {plan.target_key: params[plan.name].detach() for plan in pool.plan.tensors}
