"""run(cfg): the one orchestration shared by every experiment (VQA and math differ only in pool and task).

The merge config says which search (vlmerge.dfs.search.merge_kind):
- `ps` (merge.genome): CMA-ES over recipes scored in memory -> recipe.yaml and best/ (the merged target);
- `dfs` (merge.path): CMA-ES over layer paths through the target (A) and a donor (B) -> path.yaml and best/
  (the target's class with the path's longer layer stack);
- `ps_dfs` (both): a complete PS search in run_dir/ps (its own trials, checkpoint, recipe.yaml, report), whose
  best recipe is written into the resident target, which is tower A of a DFS search in the run dir itself
  (tower_a.yaml: that recipe; `vlmerge-merge recipe=run_dir/ps/recipe.yaml` writes the PS model alone).
Every search is the same loop (vlmerge.search.loop): checkpoints, `resume=true` continues each stage where it
stopped (a finished PS stage evaluates nothing again). The run dir always holds the final stage's trials, and
report.json: the held-out table of the sources, the untuned baselines (for VLMs the tower swap), the `ps`
stage's merge (ps_dfs) and the final merge, named `evolved`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from vlmerge.candidates import (
    FitnessFactory,
    MergeContext,
    MergeFitness,
    baseline_recipes,
    evaluate_text_only,
)
from vlmerge.dfs.path import LayerPath
from vlmerge.dfs.search import PathFitnessFactory, PathStage, check_path_stage, merge_kind
from vlmerge.errors import VlmergeError
from vlmerge.eval.evaluator import EvalResult
from vlmerge.eval.loading import load_model
from vlmerge.merge.recipe import Recipe
from vlmerge.merge.resident import tower_state
from vlmerge.models.export import model_card, write_model
from vlmerge.models.pool import Pool
from vlmerge.search.checkpoint import CHECKPOINT, atomic_write, read_trials
from vlmerge.search.fitness import Problem
from vlmerge.search.fixed import FixedSearch
from vlmerge.search.generation import SearchResult
from vlmerge.search.report import write_report

RECIPE_YAML, PATH_YAML, PS_DIR, TOWER_A_YAML = "recipe.yaml", "path.yaml", "ps", "tower_a.yaml"


def run_dir_of(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.get("run_dir") or "outputs/run")


@torch.no_grad()
def run(cfg: DictConfig) -> float:
    run_dir = run_dir_of(cfg)
    torch.manual_seed(cfg.seed)
    plain = OmegaConf.to_container(cfg, resolve=True)
    kind = merge_kind(plain["merge"])
    rescores = issubclass(searcher_class(plain["search"]), FixedSearch)  # before instantiate calls its target
    if kind != "ps" and rescores:
        raise VlmergeError(f"search=fixed re-scores PS recipes; merge={kind} searches with search=cmaes")
    searcher = instantiate(cfg.search, _convert_="all")
    ps_searcher = instantiate(ps_stage_search(plain), _convert_="all") if kind == "ps_dfs" else searcher
    baseline_ops = tuple(b["op"] for b in (plain.get("baselines") or {}).values())
    table_split = (cfg.get("table_split") or "heldout") if cfg.heldout else None
    splits = ["search"] + ([table_split] if table_split else [])  # their data is refused before the model loads
    context = MergeContext.build(plain, extra_ops=baseline_ops, splits=splits,
                                 check_pool=lambda pool, genome: check_recipes(pool, genome, plain, searcher))
    baselines = baseline_recipes(plain.get("baselines"), context.pool, cfg.seed)
    context.task.check_fitness_key()
    recipe, evolved = None, []
    if kind == "ps_dfs":
        check_path_stage(context, plain["merge"])  # refuse a bad DFS stage before the PS stage runs
    if kind in ("ps", "ps_dfs"):
        ps_dir = run_dir if kind == "ps" else run_dir / PS_DIR
        recipe, result = search_recipe(context, plain, ps_searcher, ps_dir)
        name = "evolved" if kind == "ps" else "ps"
        evolved.append((name, "ps", lambda split: context.score_recipe(recipe, split)))
    if kind == "ps":
        export_best(context, recipe, run_dir / "best")
        if not context.pool.target.spec.is_vlm:
            write_mergekit_yaml(recipe, context, run_dir / "recipe.mergekit.yaml")
    else:
        if kind == "ps_dfs":
            write_report(ps_dir, [], recipe=recipe, depth=context.depth, echo=False)
        stage = PathStage.build(context, plain["merge"], ps_recipe=recipe)
        path, result = search_path(stage, plain, searcher, run_dir)
        stage.export(path, run_dir / "best")
        evolved.append(("evolved", kind, lambda split: stage.score(path, split, restore=True)))
    rows = heldout_rows(context, baselines, plain, evolved, table_split) if table_split else []
    write_report(run_dir, rows, recipe=recipe if kind == "ps" else None, depth=context.depth)
    return result.best_fitness


def searcher_class(search: dict) -> type:
    """The class `search._target_` names. The run calls a searcher's methods and reads its settings, so a
    function there (Hydra would call it with the search keys and hand back whatever it returns) is refused."""
    target = get_object(search["_target_"])
    if not isinstance(target, type):
        raise VlmergeError(
            f"search._target_ = {search['_target_']!r} names a {type(target).__name__}, not a class; set it to "
            "a searcher class (vlmerge.search.loop.CMAESSearch, as search=cmaes does, or "
            "vlmerge.search.fixed.FixedSearch, as search=fixed does)"
        )
    return target


def check_recipes(pool: Pool, genome, plain: dict, searcher) -> None:
    """The baselines and search=fixed's recipe files, refused before the model loads when they do not fit the
    pool (a rule that selects no tensor of the target tower, other sources); the recipe files also when the
    genome cannot express them (another op), which the search would find only after the model loads."""
    baseline_recipes(plain.get("baselines"), pool, plain["seed"])
    if isinstance(searcher, FixedSearch):
        searcher.check_recipes(pool, genome)


def ps_stage_search(plain: dict) -> dict:
    """ps_dfs: the PS stage's search config, `search` with the keys given in `merge.ps` replaced."""
    overrides = dict(plain["merge"].get("ps") or {})
    allowed = sorted(k for k in plain["search"] if k != "_target_")
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise VlmergeError(f"merge.ps: unknown key(s) {unknown}; it replaces keys of search: {allowed}")
    return {**plain["search"], **overrides}


def timed_search(searcher, problem: Problem, run_dir: Path, what: str) -> SearchResult:
    start = time.perf_counter()
    result = searcher.run(problem, run_dir)
    seconds = time.perf_counter() - start
    print(f"{what} search: {result.evaluations} evaluations in {seconds:.0f} s, best search fitness "
          f"{result.best_fitness:.2f}; outputs in {run_dir}")  # fmt: skip
    return result


def search_recipe(context: MergeContext, plain: dict, searcher, run_dir: Path) -> tuple[Recipe, SearchResult]:
    """A PS search in `run_dir` (trials, checkpoint, best.json) and its best recipe, saved as recipe.yaml."""
    parallel = searcher.workers > 1
    scorer = {"factory": FitnessFactory(plain)} if parallel else {"fitness": MergeFitness(context)}
    problem = Problem.for_genome(context.genome, context.depth, context.sources, seed=plain["seed"], **scorer)
    result = timed_search(searcher, problem, run_dir, "PS")
    recipe = context.genome.decode(result.best_x, context.depth, context.sources, seed=plain["seed"],
                                   pool=context.pool.to_config())  # fmt: skip
    atomic_write(run_dir / RECIPE_YAML, recipe.to_yaml().encode())
    return recipe, result


def keep_tower_a(run_dir: Path, recipe: Recipe) -> None:
    """ps_dfs: the PS recipe that is tower A, kept beside the DFS stage; a resumed DFS stage must have the
    same A (a PS stage resumed with other settings can end on another recipe)."""
    file = run_dir / TOWER_A_YAML
    started = (run_dir / CHECKPOINT).exists() or bool(read_trials(run_dir))
    if started and file.is_file() and Recipe.from_yaml(file.read_text(), where=str(file)) != recipe:
        raise VlmergeError(
            f"{run_dir}: the DFS stage was searched over the PS recipe in {file}, but the PS stage now "
            f"ends on another ({run_dir / PS_DIR / RECIPE_YAML}); resume with the first run's merge.ps "
            "settings, or start a new run dir"
        )
    atomic_write(file, recipe.to_yaml().encode())


def search_path(stage: PathStage, plain: dict, searcher, run_dir: Path) -> tuple[LayerPath, SearchResult]:
    """A DFS search in `run_dir` and its best path, written as path.yaml."""
    if stage.ps_recipe is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        keep_tower_a(run_dir, stage.ps_recipe)
    recipe = None if stage.ps_recipe is None else stage.ps_recipe.to_dict()
    problem = stage.problem(PathFitnessFactory(plain, recipe) if searcher.workers > 1 else None)
    result = timed_search(searcher, problem, run_dir, "DFS")
    path = stage.decode(result.best_x)
    atomic_write(run_dir / PATH_YAML, yaml.safe_dump(path.to_dict(), sort_keys=False).encode())
    print(f"best path ({len(path.layers)} layers, A = {'the PS merge' if recipe else 'the target'}, "
          f"B = {stage.donor}): {path.describe()}")  # fmt: skip
    return path, result


def export_best(context: MergeContext, recipe, output_dir: Path) -> Path:
    """best/: the resident model's tower as scored (bit-for-bit), written with the core exporter."""
    context.resident_merger().apply(recipe)
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
    from vlmerge.merge.mergekit_export import to_mergekit_yaml

    path.write_text(to_mergekit_yaml(recipe, context.pool.to_config(), context.depth))


def _row(name: str, result: EvalResult, **extra) -> dict:
    values = {k: round(v, 4) for k, v in result.values.items()}
    return {"name": name, "split": result.split, **extra, **values}


def heldout_rows(context: MergeContext, baselines: dict, cfg: dict, evolved: list[tuple],
                 split: str = "heldout") -> list[dict]:
    """The final table on `split` (held-out unless `table_split` says otherwise): each source, the untuned
    baselines, the tower swap (VLMs), then the searched merges (`evolved`: (name, merge kind, split ->
    EvalResult), in order; the final one is named "evolved")."""
    rows = []
    is_vlm = context.pool.target.spec.is_vlm
    rows.append(_row("target", context.score_source("target", split), kind="source"))
    for name, tower in context.pool.donors.items():
        if is_vlm and not tower.spec.is_vlm:
            donor = load_model(tower.ref, trust_remote_code=context.pool.trust_remote_code)
            blind = evaluate_text_only(donor, context.task_for(split), split)
            rows.append(_row(name, blind, kind="source (text only)"))
            del donor
            if cfg.get("tower_swap", True):
                rows.append(_row(f"tower_swap_{name}", context.score_source(name, split), kind="baseline"))
        else:
            rows.append(_row(name, context.score_source(name, split), kind="source"))
    for name, baseline in baselines.items():
        rows.append(_row(name, context.score_recipe(baseline, split), kind="baseline"))
    for name, merge, score in evolved:
        rows.append(_row(name, score(split), kind="evolved" if name == "evolved" else "stage", merge=merge))
    return rows
