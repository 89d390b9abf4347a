"""DFS search: layer paths through tower A (the resident target, or a PS merge held in it) and a donor's B.

`PathStage` is what a process needs to score paths: the MergeContext (resident model, task), the genome
(PathSpec), the PathModel over the resident model, and the PS recipe that makes tower A (`ps_dfs`; None for
`dfs`: A is the target). `PathFitness` scores a gene vector: an empty path raises EmptyPathError, which the
search loop logs as a failed candidate and ranks below every success. `PathFitnessFactory` rebuilds all of it
in a Ray worker from the plain config (and the PS recipe as a mapping).

Which search a merge config asks for is data: `genome` (parameter space), `path` (data-flow space), both (PS
then DFS; `ps` holds the PS stage's search settings). See conf/merge/dfs.yaml and conf/merge/ps_dfs.yaml.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate

from vlmerge.candidates import MergeContext
from vlmerge.dfs.export import export_path
from vlmerge.dfs.model import PathModel, check_foldable, decoder_stack
from vlmerge.dfs.path import EmptyPathError, LayerPath, PathSpec
from vlmerge.errors import VlmergeError
from vlmerge.eval.evaluator import EvalResult, evaluate
from vlmerge.merge.recipe import Recipe
from vlmerge.models.pool import Pool
from vlmerge.search.fitness import Evaluation, Problem


def check_path_stage(context: MergeContext, merge: Mapping) -> tuple[str, PathSpec]:
    """The DFS stage's donor (tower B) and genome, or the refusal PathStage.build would give, without loading
    B's layers: ps_dfs asks before its PS stage runs. A scaled path, and any path the path model folds, needs
    a pre-norm RMSNorm family (export refuses the others at the end)."""
    pool = context.pool
    donor = donor_of(pool, merge.get("donor"))
    spec = instantiate(merge["path"], _convert_="all")(depth_a=pool.target.depth, depth_b=pool.donors[donor].depth)
    if spec.scaling != "none" or merge["path_model"].get("fold", True):
        stack = decoder_stack(context.bundle.model)
        check_foldable(stack.config, stack.layers[0])
    return donor, spec


def merge_kind(merge: Mapping) -> str:
    """`ps` (merge.genome), `dfs` (merge.path) or `ps_dfs` (both)."""
    has_genome, has_path = bool(merge.get("genome")), bool(merge.get("path"))
    if merge.get("ps") and not (has_genome and has_path):
        raise VlmergeError("merge.ps (the PS stage's search settings) needs both merge.genome and merge.path")
    if has_genome:
        return "ps_dfs" if has_path else "ps"
    if has_path:
        return "dfs"
    raise VlmergeError(
        "merge config has neither `genome` (parameter-space search) nor `path` (data-flow-space search); "
        "pick one of conf/merge/ (merge=ties_dare, merge=dfs, merge=ps_dfs ...)"
    )


def donor_of(pool: Pool, name: str | None) -> str:
    """The pool donor that is tower B: `merge.donor`, or the pool's only donor."""
    names = list(pool.donors)
    if name is None:
        if len(names) != 1:
            raise VlmergeError(
                f"merge.donor: the pool has {len(names)} donors {names}; name the one that is tower B "
                "(merge.donor=NAME)"
            )
        return names[0]
    if name not in pool.donors:
        raise VlmergeError(f"merge.donor = {name!r} is not a donor of the pool; its donors are {names}")
    return name


def describe_genes(spec: PathSpec, x: np.ndarray) -> dict | None:
    """The decoded path for the trial log; None when it selects no layer (the trial's error says so)."""
    try:
        return spec.decode(x).to_dict()
    except EmptyPathError:
        return None


@dataclass
class PathStage:
    """Paths run on the resident model: A's layers are its own (holding `ps_recipe`), B's the donor's."""

    context: MergeContext
    spec: PathSpec
    path_model: PathModel
    donor: str
    ps_recipe: Recipe | None = None

    @classmethod
    def build(cls, context: MergeContext, merge: Mapping, ps_recipe: Recipe | None = None) -> PathStage:
        """From the plain `merge` config (`donor`, partial `path` and `path_model`); A's weights are set."""
        donor, spec = check_path_stage(context, merge)
        path_model = instantiate(merge["path_model"], _convert_="all")(context.bundle.model, context.pool.donors[donor])
        stage = cls(context, spec, path_model, donor, ps_recipe)
        stage.restore_a()
        return stage

    def restore_a(self) -> None:
        """Tower A's weights into the resident model: the PS recipe (ps_dfs), else the target's own."""
        if self.ps_recipe is not None:
            self.context.resident_merger().apply(self.ps_recipe)
        elif self.context.merger is not None:  # without a merger nothing ever changed the loaded target
            self.context.merger.load_source("target")

    def decode(self, x: np.ndarray) -> LayerPath:
        return self.spec.decode(x)

    def score(self, path: LayerPath, split: str = "search", *, restore: bool = False) -> EvalResult:
        """The task on `split` with `path` installed (`restore`: A's weights first, after other merges)."""
        if restore:
            self.restore_a()
        with self.path_model.installed(path):
            return evaluate(self.context.bundle, self.context.task_for(split), split)

    def problem(self, factory: PathFitnessFactory | None = None) -> Problem:
        """The search problem: x0 from the genome; scored here, or by workers built with `factory`."""
        spec = self.spec
        fitness = None if factory is not None else PathFitness(self)
        return Problem(x0=spec.x0(), fitness=fitness, factory=factory,
                       describe=lambda x: describe_genes(spec, x), encode=spec.encode)  # fmt: skip

    def export(self, path: LayerPath, output_dir: Path) -> Path:
        """`output_dir`: an ordinary model of the target's class with the path's layer stack (A restored)."""
        self.restore_a()
        return export_path(self.path_model, path, output_dir, target=self.context.pool.target, overwrite=True)


class PathFitness:
    """Gene vector -> LayerPath installed on the resident model -> task score on the search split."""

    def __init__(self, stage: PathStage):
        self.stage = stage

    @torch.no_grad()
    def __call__(self, x: np.ndarray) -> Evaluation:
        path = self.stage.decode(x)
        result = self.stage.score(path, "search")
        return Evaluation(fitness=result.fitness, details={**result.values, "layers": len(path.layers)})


@dataclass(frozen=True)
class PathFitnessFactory:
    """Picklable: builds a PathFitness (its own models; A holds `ps_recipe`) in the process that calls it."""

    cfg: Mapping
    ps_recipe: Mapping | None = None  # Recipe.to_dict() of the PS stage's best (ps_dfs)

    @torch.no_grad()
    def __call__(self) -> PathFitness:
        recipe = None if self.ps_recipe is None else Recipe.from_dict(self.ps_recipe, where="PS stage recipe")
        context = MergeContext.build(self.cfg, verbose=False, with_merger=recipe is not None)
        return PathFitness(PathStage.build(context, self.cfg["merge"], recipe))
