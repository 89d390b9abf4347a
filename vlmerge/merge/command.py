"""`vlmerge-merge`: read a recipe (vlmerge or mergekit YAML), open the pool, write the merged model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from vlmerge.errors import VlmergeError
from vlmerge.eval.loading import check_device
from vlmerge.merge.merger import check_sources, merged_tensors
from vlmerge.merge.recipe import Recipe
from vlmerge.models.export import model_card, out_dtype_of, parse_size, write_model
from vlmerge.models.pool import Pool
from vlmerge.models.source import to_dtype


def read_recipe_file(path: Path | str) -> tuple[Recipe, dict | None]:
    """A recipe and the pool it names (None when it names none). mergekit YAML is recognised by its keys."""
    path = Path(path)
    if not path.is_file():
        raise VlmergeError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise VlmergeError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, Mapping):
        raise VlmergeError(f"{path}: expected a mapping at the top level")
    if "merge_method" in raw:
        from vlmerge.merge.mergekit_yaml import from_mergekit

        return from_mergekit(raw, where=str(path))
    recipe = Recipe.from_dict(raw, where=str(path))
    recipe.check_read()
    return recipe, dict(recipe.pool) if recipe.pool is not None else None


def open_pool(pool_cfg: Mapping, **options) -> Pool:
    kwargs = {k: v for k, v in dict(pool_cfg).items() if k != "_target_"}
    for key, value in options.items():
        kwargs[key] = kwargs.get(key) or value  # a pool's own opt-in stays on
    try:
        return Pool(**kwargs)
    except TypeError as err:  # unknown key in the pool config
        raise VlmergeError(f"pool config: {err}") from None


def merge_command(cfg: DictConfig) -> Path:
    missing = [key for key in ("recipe", "output_dir") if OmegaConf.is_missing(cfg, key)]
    if missing:
        raise VlmergeError(f"give {' and '.join(f'{key}=PATH' for key in missing)} (vlmerge-merge recipe=R.yaml "
                           "output_dir=OUT)")
    seed = cfg.get("seed")
    if seed is not None and (isinstance(seed, bool) or not str(seed).lstrip("-").isdigit()):
        raise VlmergeError(f"seed = {seed!r}: give an integer (the DARE masks' seed) or leave it out")
    parse_size(cfg.max_shard_size)  # refused before the pool is opened
    check_device(cfg.device)
    recipe, recipe_pool = read_recipe_file(cfg.recipe)
    chosen = cfg.get("pool")
    pool_cfg = OmegaConf.to_container(chosen, resolve=True) if chosen is not None else recipe_pool
    if pool_cfg is None:
        raise VlmergeError(
            f"{cfg.recipe} names no models: choose a pool (pool=NAME, or +pool.target.path=... "
            "+pool.base.path=... +pool.donors.NAME.path=...) or add a `pool:` block"
        )
    pool = open_pool(pool_cfg, allow_vocab_mismatch=cfg.allow_vocab_mismatch, allow_pickle=cfg.allow_pickle)
    if cfg.get("seed") is not None:
        recipe = replace(recipe, seed=int(cfg.seed))
    recipe = replace(recipe, pool=pool.to_config())
    check_sources(pool, recipe)
    return export_recipe(pool, recipe, Path(cfg.output_dir), overwrite=cfg.overwrite, device=cfg.device,
                         compute_dtype=cfg.compute_dtype, out_dtype=cfg.out_dtype,
                         max_shard_size=cfg.max_shard_size)  # fmt: skip


def export_recipe(pool: Pool, recipe: Recipe, output_dir: Path, *, overwrite: bool = False, device: str = "cpu",
                  compute_dtype: str = "float32", out_dtype: str | None = None,
                  max_shard_size: str | int = "2GB") -> Path:  # fmt: skip
    """The core exporter: the target model with the recipe's merged tower, at `output_dir`."""
    recipe_yaml = recipe.to_yaml()
    out = out_dtype_of(out_dtype)
    return write_model(
        pool,
        output_dir,
        lambda: merged_tensors(pool, recipe, device=device, compute_dtype=to_dtype(compute_dtype), out_dtype=out),
        card=model_card(pool, recipe_yaml, pool.plan.summary()),
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        out_dtype=out,
        extra_files={"vlmerge_recipe.yaml": recipe_yaml},
    )
