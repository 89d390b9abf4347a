"""`vlmerge-eval`: evaluate a model, a recipe applied in memory, or a predictions file on a task split.

Data problems are found before any model is loaded; files are written only after everything succeeded,
each to a temporary name first and then renamed, predictions.jsonl before report.json.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from vlmerge.cli import config_options
from vlmerge.errors import VlmergeError
from vlmerge.eval.evaluator import EvalResult, evaluate, read_predictions, score_predictions
from vlmerge.eval.loading import ModelBundle, load_model
from vlmerge.eval.task import Task, instantiate_task
from vlmerge.models.source import ModelRef

MODES = ("model", "recipe", "predictions")


def eval_command(cfg: DictConfig) -> EvalResult:
    """Run one evaluation as the config says, print the table, write the files when output_dir is set."""
    modes = [mode for mode in MODES if cfg.get(mode)]
    if len(modes) != 1:
        raise VlmergeError(
            "give exactly one of model=PATH_OR_HUB_ID, recipe=RECIPE.yaml or predictions=FILE.jsonl"
            + (f" (got {', '.join(modes)})" if modes else "")
        )
    if not cfg.progress:  # also silence transformers' weight-loading bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if cfg.get("task") is None:
        raise VlmergeError(f"choose a task: task=NAME, one of {', '.join(config_options('task'))}")
    task = instantiate_task(cfg.task)
    try:
        source = str(cfg[modes[0]])
        if modes[0] == "predictions":
            result = score_predictions(task, cfg.split, read_predictions(source), source=source)
            model = None
        else:
            task.check_fitness_key()
            task.prepare(cfg.split)  # refuse bad data before loading any weights
            bundle = _load_recipe(cfg, source) if modes[0] == "recipe" else _load(cfg, source)
            model = bundle.ref.path
            result = evaluate(bundle, task, cfg.split, progress=bool(cfg.progress))
        report = build_report(
            result,
            task,
            requested_split=cfg.split,
            model=model,
            recipe=source if modes[0] == "recipe" else None,
            predictions=source if modes[0] == "predictions" else None,
        )
        if cfg.get("output_dir"):
            write_outputs(result, report, Path(cfg.output_dir))
        print(format_table(report))
        if cfg.get("output_dir"):
            print(
                f"wrote {Path(cfg.output_dir) / 'predictions.jsonl'}, {Path(cfg.output_dir) / 'report.json'}"
            )
        return result
    finally:
        task.close()


def _device(cfg: DictConfig) -> str | None:
    device = cfg.get("device") or "auto"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def _load(cfg: DictConfig, path: str) -> ModelBundle:
    ref = ModelRef(
        path=path, revision=cfg.get("revision"), dtype=cfg.get("dtype") or "float32", device=_device(cfg)
    )
    return load_model(
        ref, trust_remote_code=bool(cfg.trust_remote_code), attn_implementation=cfg.attn_implementation
    )


def _load_recipe(cfg: DictConfig, path: str) -> ModelBundle:
    """The recipe's pool target, loaded, with the recipe's merged tower written into it in memory."""
    from vlmerge.merge.command import open_pool, read_recipe_file
    from vlmerge.merge.merger import check_sources
    from vlmerge.merge.resident import ResidentMerger

    recipe, recipe_pool = read_recipe_file(path)
    chosen = cfg.get("pool")
    pool_cfg = OmegaConf.to_container(chosen, resolve=True) if chosen is not None else recipe_pool
    if pool_cfg is None:
        raise VlmergeError(
            f"{path} names no models: choose a pool (pool=NAME, or +pool.target.path=... "
            "+pool.base.path=... +pool.donors.NAME.path=...) or add a `pool:` block"
        )
    pool = open_pool(
        pool_cfg, allow_vocab_mismatch=bool(cfg.allow_vocab_mismatch), allow_pickle=bool(cfg.allow_pickle)
    )
    check_sources(pool, recipe)  # before the weights are loaded
    ref = replace(pool.target.ref, dtype=cfg.get("dtype") or pool.target.ref.dtype, device=_device(cfg))
    bundle = load_model(
        ref, trust_remote_code=bool(cfg.trust_remote_code), attn_implementation=cfg.attn_implementation
    )
    ResidentMerger.for_model(bundle.model, pool, ops=(recipe.op,)).apply(recipe)
    return bundle


def build_report(
    result: EvalResult,
    task: Task,
    *,
    requested_split: str,
    model: str | None = None,
    recipe: str | None = None,
    predictions: str | None = None,
) -> dict:
    return {
        "task": result.task,
        "split": result.split,
        "requested_split": requested_split,
        "model": model,
        "recipe": recipe,
        "predictions_file": predictions,
        "metric": task.metric_name,
        "values": result.values,
        "fitness_key": result.fitness_key,
        "fitness": result.fitness,
        "n_items": result.n_items,
        "n_skipped": len(result.skipped),
        "skipped_ids": list(result.skipped),
        "seconds": round(result.seconds, 3),
        "task_config": task.describe(),
    }


def format_table(report: dict) -> str:
    source = report["model"] or report["predictions_file"]
    if report["recipe"]:
        source = f"{report['recipe']} on {report['model']}"
    lines = [
        f"task {report['task']}  split {report['split']}  {source}",
        f"{report['n_items']} items, {report['n_skipped']} skipped (unreadable images, scored empty), "
        f"{report['seconds']:.1f} s",
    ]
    width = max(len(key) for key in report["values"])
    lines.append(f"{'metric'.ljust(width)}  value")
    for key, value in report["values"].items():
        mark = "  <- fitness" if key == report["fitness_key"] else ""
        lines.append(f"{key.ljust(width)}  {value:.4f}{mark}")
    return "\n".join(lines)


def write_outputs(result: EvalResult, report: dict, output_dir: Path) -> None:
    """predictions.jsonl then report.json, each atomically (a temp file in the folder, then a rename)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise VlmergeError(f"output_dir {output_dir} is a file, not a folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(row, ensure_ascii=False, default=_plain) + "\n" for row in result.rows())
    _atomic_write(output_dir / "predictions.jsonl", lines)
    _atomic_write(
        output_dir / "report.json", json.dumps(report, ensure_ascii=False, indent=2, default=_plain) + "\n"
    )


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _plain(value):
    """JSON fallback for per-item scores: numpy scalars, tuples, sets."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)
