"""Scoring merge candidates: one process's resident target, cached task vectors, task and genome.

`MergeContext` is what a process needs to score recipes; `MergeFitness` turns a gene vector into a fitness;
`FitnessFactory` rebuilds both from a plain config in another process (a Ray worker builds its own models).
A DFS search (vlmerge.dfs.search) runs paths on the same context (without `merge.genome` it has no genome).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate

from vlmerge.errors import VlmergeError
from vlmerge.eval.evaluator import EvalResult, evaluate
from vlmerge.eval.generate import generate
from vlmerge.eval.loading import ModelBundle, load_model
from vlmerge.eval.metrics import MetricResult
from vlmerge.eval.task import Task, instantiate_task
from vlmerge.merge.command import open_pool
from vlmerge.merge.merger import check_sources
from vlmerge.merge.recipe import Recipe
from vlmerge.merge.resident import ResidentMerger
from vlmerge.models.pool import Pool
from vlmerge.search.fitness import Evaluation

IMAGE_PLACEHOLDER = "<image>"


@dataclass
class MergeContext:
    pool: Pool
    task: Task
    bundle: ModelBundle
    merger: ResidentMerger | None  # None: built without (a DFS worker that merges nothing)
    genome: Any  # vlmerge.merge.genome.Genome; None for a merge config without one (merge=dfs)
    seed: int
    heldout_task: Task | None = None  # scores the held-out table when fitness data has no held-out split

    @property
    def depth(self) -> int:
        return self.pool.plan.depth

    @property
    def sources(self) -> tuple[str, ...]:
        return self.pool.source_names

    @classmethod
    def build(cls, cfg: Mapping, *, verbose: bool = True, extra_ops: tuple[str, ...] = (), with_merger: bool = True,
              check_pool: Callable[[Pool, Any], None] | None = None,
              splits: Sequence[str] = ()) -> MergeContext:  # fmt: skip
        """From a resolved plain config with `pool`, `task`, `merge` (`genome` optional), `seed`.

        Bad input is refused before the model loads: the genome's kinds against the target tower, what
        `check_pool` refuses of the opened pool and the genome (run: baselines and given recipes), the data of
        `splits`.
        """
        heldout_cfg = checked_heldout_task(cfg.get("heldout_task"))  # before the pool is opened
        pool = open_pool(cfg["pool"], verbose=verbose)
        task = instantiate_task(cfg["task"])
        heldout_task = instantiate_heldout_task(heldout_cfg) if heldout_cfg else None
        genome_cfg = cfg["merge"].get("genome")
        genome = instantiate(genome_cfg, _convert_="all") if genome_cfg else None
        if genome is not None:
            genome.check_kinds(pool.target.names, pool.plan.depth)
        if check_pool is not None:
            check_pool(pool, genome)
        for split in splits:
            split_task(task, heldout_task, split).prepare(split)
        bundle = load_model(pool.target.ref, trust_remote_code=pool.trust_remote_code)
        ops = (*((genome.op,) if genome is not None else ()), *extra_ops)
        merger = ResidentMerger.for_model(bundle.model, pool, ops=ops) if with_merger else None
        return cls(pool=pool, task=task, bundle=bundle, merger=merger, genome=genome, seed=int(cfg["seed"]),
                   heldout_task=heldout_task)

    def decode(self, x: np.ndarray) -> Recipe:
        return self.genome.decode(x, self.depth, self.sources, seed=self.seed)

    def task_for(self, split: str) -> Task:
        return split_task(self.task, self.heldout_task, split)

    def score_recipe(self, recipe: Recipe, split: str = "search") -> EvalResult:
        self.resident_merger().apply(recipe)
        return evaluate(self.bundle, self.task_for(split), split)

    def score_source(self, role: str, split: str) -> EvalResult:
        """A source's own tower in the resident target (for a text donor in a VLM: the tower swap)."""
        self.resident_merger().load_source(role)
        return evaluate(self.bundle, self.task_for(split), split)

    def resident_merger(self) -> ResidentMerger:
        if self.merger is None:
            raise VlmergeError("this merge context was built without a resident merger (with_merger=False)")
        return self.merger


class MergeFitness:
    """Gene vector -> decoded recipe written into the resident model -> task score on the search split."""

    def __init__(self, context: MergeContext):
        self.context = context

    @torch.no_grad()
    def __call__(self, x: np.ndarray) -> Evaluation:
        recipe = self.context.decode(x)
        result = self.context.score_recipe(recipe, "search")
        return Evaluation(fitness=result.fitness, details=dict(result.values))


@dataclass(frozen=True)
class FitnessFactory:
    """Picklable: builds a MergeFitness (with its own models) in the process that calls it."""

    cfg: Mapping

    @torch.no_grad()
    def __call__(self) -> MergeFitness:
        return MergeFitness(MergeContext.build(self.cfg, verbose=False))


def split_task(task: Task, heldout_task: Task | None, split: str) -> Task:
    """The task that scores `split`: `heldout_task` scores the held-out split when there is one."""
    return heldout_task if split == "heldout" and heldout_task is not None else task


def checked_heldout_task(value: Any) -> Mapping | None:
    """`heldout_task` as a task config node, or None (not set); anything else (a task's name given as
    `heldout_task=NAME`, which only sets a string) is refused naming it and the tasks there are."""
    if value is None or isinstance(value, Mapping):
        return value or None
    from vlmerge.cli import config_options

    names = config_options("task")
    how = "+task@heldout_task=NAME (task@heldout_task=NAME where the experiment already sets one)"
    if isinstance(value, str) and value in names:
        raise VlmergeError(f"heldout_task = {value!r} is a task's name, not its config: choose it with "
                           f"{how.replace('NAME', value)}")  # fmt: skip
    raise VlmergeError(f"heldout_task = {value!r}: not a task; choose one with {how}, NAME one of {', '.join(names)}")


def instantiate_heldout_task(node: Mapping) -> Task:
    """instantiate_task, its refusal naming heldout_task (the fitness task's refusals look the same)."""
    try:
        return instantiate_task(node, key="heldout_task")
    except VlmergeError as err:
        message = str(err)
        named = (f"heldout_task config: {message.removeprefix('task config: ')}" if message.startswith("task config: ")
                 else f"heldout_task: {message}")  # fmt: skip
        error = VlmergeError(named)
        error.exit_code = err.exit_code
        raise error from None


def evaluate_text_only(bundle: ModelBundle, task: Task, split: str) -> EvalResult:
    """A text-only model on a task with images: the same prompts without the image (a blind answer)."""
    items = task.split(split)
    prompts = [task.prompt.format(question=item.question).replace(IMAGE_PLACEHOLDER, "").lstrip("\n")
               for item in items]  # fmt: skip
    if task.chat_template:
        prompts = [bundle.chat_prompt(p, system=task.system_prompt, has_image=False) for p in prompts]
    start = time.perf_counter()
    outputs = generate(bundle, prompts, None, task.generation)
    predictions = [task.postprocess(o) for o in outputs]
    metric: MetricResult = task.score(predictions, items)
    return EvalResult(task=task.name, split=split, items=tuple(items), predictions=tuple(predictions),
                      outputs=tuple(outputs), metric=metric, fitness_key=task.fitness_key,
                      seconds=time.perf_counter() - start)  # fmt: skip


def baseline_recipes(baselines: Mapping, pool: Pool, seed: int) -> dict[str, Recipe]:
    """Untuned merges from config: {name: {op, rules, ...}} with the pool's sources filled in, each checked
    against the pool (a rule that selects no tensor of the target tower is refused naming baselines.NAME)."""
    out = {}
    for name, spec in (baselines or {}).items():
        if not isinstance(spec, Mapping) or "op" not in spec:
            raise VlmergeError(f"baselines.{name}: give at least `op` (and `rules`)")
        recipe = Recipe.from_dict({**dict(spec), "sources": list(pool.source_names)}, where=f"baselines.{name}")
        recipe.check_read()
        check_sources(pool, recipe)  # its rules name baselines.NAME
        out[name] = replace(recipe, seed=seed)
    return out
