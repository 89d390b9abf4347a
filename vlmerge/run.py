"""run(cfg): the one orchestration shared by every experiment (VQA and math differ only in pool and task).

pool + task + genome -> CMA-ES over recipes scored in memory on the search split -> best/ and recipe.yaml ->
held-out table of the sources, the untuned baselines (and, for VLMs, the tower swap) and the evolved merge.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vlmerge.candidates import (
    FitnessFactory,
    MergeContext,
    MergeFitness,
    baseline_recipes,
    evaluate_text_only,
)
from vlmerge.eval.evaluator import EvalResult
from vlmerge.eval.loading import load_model
from vlmerge.merge.resident import tower_state
from vlmerge.models.export import model_card, write_model
from vlmerge.search.fitness import Problem
from vlmerge.search.report import write_report

log = logging.getLogger(__name__)


def run_dir_of(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.get("run_dir") or "outputs/run")


def run(cfg: DictConfig) -> float:
    run_dir = run_dir_of(cfg)
    torch.manual_seed(cfg.seed)
    torch.set_grad_enabled(False)
    plain = OmegaConf.to_container(cfg, resolve=True)
    context = MergeContext.build(plain, extra_ops=tuple(b["op"] for b in (plain.get("baselines") or {}).values()))
    baselines = baseline_recipes(plain.get("baselines"), context.sources, cfg.seed)
    context.task.check_fitness_key()
    searcher = instantiate(cfg.search, _convert_="all")
    if searcher.workers > 1:
        problem = Problem.for_genome(context.genome, context.depth, context.sources, factory=FitnessFactory(plain),
                                     seed=cfg.seed)  # fmt: skip
    else:
        problem = Problem.for_genome(context.genome, context.depth, context.sources, fitness=MergeFitness(context),
                                     seed=cfg.seed)  # fmt: skip
    start = time.perf_counter()
    result = searcher.run(problem, run_dir)
    search_seconds = time.perf_counter() - start
    recipe = context.genome.decode(result.best_x, context.depth, context.sources, seed=cfg.seed,
                                   pool=context.pool.to_config())  # fmt: skip
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    export_best(context, recipe, run_dir / "best")
    if not context.pool.target.spec.is_vlm:
        write_mergekit_yaml(recipe, context, run_dir / "recipe.mergekit.yaml")
    rows = heldout_rows(context, baselines, recipe, plain) if cfg.heldout else []
    write_report(run_dir, rows, recipe=recipe, depth=context.depth)
    print(f"search: {result.evaluations} evaluations in {search_seconds:.0f} s, best search fitness "
          f"{result.best_fitness:.2f}; outputs in {run_dir}")  # fmt: skip
    return result.best_fitness


def export_best(context: MergeContext, recipe, output_dir: Path) -> Path:
    """best/: the resident model's tower as scored (bit-for-bit), written with the core exporter."""
    context.merger.apply(recipe)
    state = tower_state(context.bundle.model, context.pool)
    recipe_yaml = recipe.to_yaml()
    return write_model(
        context.pool,
        output_dir,
        lambda: ((key, state[key].to("cpu", copy=True)) for key in state),
        card=model_card(context.pool, recipe_yaml, context.pool.plan.summary()),
        overwrite=True,
        extra_files={"vlmerge_recipe.yaml": recipe_yaml},
    )


def write_mergekit_yaml(recipe, context: MergeContext, path: Path) -> None:
    from vlmerge.merge.mergekit_yaml import to_mergekit_yaml

    path.write_text(to_mergekit_yaml(recipe, context.pool.to_config(), context.depth))


def _row(name: str, result: EvalResult, **extra) -> dict:
    return {"name": name, "split": result.split, **extra, **{k: round(v, 4) for k, v in result.values.items()}}


def heldout_rows(context: MergeContext, baselines: dict, recipe, cfg: dict) -> list[dict]:
    """The held-out table: each source, the untuned baselines, the tower swap (VLMs), the evolved merge."""
    split, rows = "heldout", []
    is_vlm = context.pool.target.spec.is_vlm
    rows.append(_row("target", context.score_source("target", split), kind="source"))
    for name, tower in context.pool.donors.items():
        if is_vlm and not tower.spec.is_vlm:
            donor = load_model(tower.ref, trust_remote_code=context.pool.trust_remote_code)
            rows.append(_row(name, evaluate_text_only(donor, context.task_for(split), split), kind="source (text only)"))
            del donor
            if cfg.get("tower_swap", True):
                rows.append(_row(f"tower_swap_{name}", context.score_source(name, split), kind="baseline"))
        else:
            rows.append(_row(name, context.score_source(name, split), kind="source"))
    for name, baseline in baselines.items():
        rows.append(_row(name, context.score_recipe(baseline, split), kind="baseline"))
    rows.append(_row("evolved", context.score_recipe(recipe, split), kind="evolved"))
    return rows
