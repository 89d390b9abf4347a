"""End-of-run pictures: fitness per generation (from trials.jsonl) and the evolved recipe per layer.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch), so plotting works
headless and does not disturb a caller that uses pyplot itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vlmerge.merge.genome import LAYER_REPRESENTATIVES
from vlmerge.merge.ops import get_op
from vlmerge.merge.recipe import Recipe
from vlmerge.models.towers import EMBED, HEAD
from vlmerge.search.checkpoint import read_trials

FITNESS_PNG = "fitness.png"
RECIPE_PNG = "recipe.png"
KIND_STYLES = {"attention": "-", "mlp": "--", "norm": ":"}


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def fitness_by_generation(rows: list[dict]) -> tuple[list[int], list[float], list[float], list[float]]:
    """(generations, best of generation, mean of generation, best so far); failed trials left out."""
    by_gen: dict[int, list[float]] = {}
    for row in rows:
        if row.get("fitness") is not None:
            by_gen.setdefault(int(row["generation"]), []).append(float(row["fitness"]))
    gens = sorted(by_gen)
    best = [max(by_gen[g]) for g in gens]
    mean = [float(np.mean(by_gen[g])) for g in gens]
    return gens, best, mean, list(np.maximum.accumulate(best)) if best else []


def plot_fitness(run_dir: Path | str) -> Path | None:
    """`fitness.png` in the run dir; None when there is no successful trial to draw."""
    run_dir = Path(run_dir)
    rows = read_trials(run_dir)
    gens, best, mean, so_far = fitness_by_generation(rows)
    if not gens:
        return None
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    scattered = [(r["generation"], r["fitness"]) for r in rows if r.get("fitness") is not None]
    ax.scatter(*zip(*scattered), s=8, alpha=0.25, color="grey", label="trial")
    ax.plot(gens, mean, marker=".", label="generation mean")
    ax.plot(gens, best, marker=".", label="generation best")
    ax.plot(gens, so_far, color="black", label="best so far")
    failed = sum(r.get("fitness") is None for r in rows)
    ax.set(
        xlabel="generation",
        ylabel="fitness (higher is better)",
        title=f"{len(rows)} evaluations" + (f", {failed} failed" if failed else ""),
    )
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, run_dir / FITNESS_PNG)


def recipe_table(recipe: Recipe, depth: int) -> dict[str, dict[str, dict[str, list[float]]]]:
    """param -> source (or "all" for t) -> kind -> values at x = -1 (embedding), 0..depth-1, depth (head)."""
    spec = get_op(recipe.op)
    params = [*spec.per_source, *(["t"] if "t" in spec.shared else [])]
    table: dict = {p: {} for p in params}
    edges = (recipe.args_for(EMBED, None, "embedding"), recipe.args_for(HEAD, None, "embedding"))
    for kind, template in LAYER_REPRESENTATIVES:
        layer_args = [recipe.args_for(template.format(i=i), i, kind) for i in range(depth)]
        for param in params:
            for i, source in enumerate(["all"] if param == "t" else recipe.sources):
                pick = (lambda a: a.t) if param == "t" else (lambda a, i=i, p=param: getattr(a, p)[i])
                table[param].setdefault(source, {})[kind] = [
                    pick(edges[0]),
                    *map(pick, layer_args),
                    pick(edges[1]),
                ]
    return table


def plot_recipe(recipe: Recipe, depth: int, path: Path | str) -> Path:
    """Per parameter a panel; per source a colour; attention solid, mlp dashed and norm dotted where they
    differ from attention. x = -1 is the input embedding, x = depth the head."""
    table = recipe_table(recipe, depth)
    fig = Figure(figsize=(7.0, 2.6 * len(table)))
    xs = np.arange(-1, depth + 1)
    for row, (param, per_source) in enumerate(table.items()):
        ax = fig.add_subplot(len(table), 1, row + 1)
        for j, (source, per_kind) in enumerate(per_source.items()):
            color = f"C{j}"
            for kind, values in per_kind.items():
                style = KIND_STYLES[kind]
                if kind != "attention" and values == per_kind["attention"]:
                    continue
                label = source if kind == "attention" else f"{source} ({kind})"
                ax.plot(xs[1:-1], values[1:-1], style, color=color, marker=".", label=label)
                if kind == "attention":
                    ax.plot([xs[0], xs[-1]], [values[0], values[-1]], "s", color=color, markersize=5)
        ax.set(ylabel=param, xlim=(-1.5, depth + 0.5))
        ax.set_xticks([-1, *range(0, depth, max(1, depth // 8)), depth])
        ax.set_xticklabels(["emb", *map(str, range(0, depth, max(1, depth // 8))), "head"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.axes[0].set_title(f"{recipe.op}: values per layer (squares: embedding, head)")
    fig.axes[-1].set_xlabel("layer")
    return _save(fig, Path(path))
