"""End-of-run report: the score table (evolved recipe vs baselines) as report.json and as printed text.

`run()` computes the rows (one per model and split: {"name", "split", metric: value, ...}, the evolved model
named "evolved"); this module writes them with a summary of the search from trials.jsonl, and draws the plots.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from vlmerge.errors import VlmergeError
from vlmerge.merge.recipe import Recipe
from vlmerge.search.checkpoint import read_trials, write_json
from vlmerge.search.plots import fitness_by_generation, plot_fitness, plot_recipe

REPORT_JSON = "report.json"


def search_summary(rows: list[dict]) -> dict | None:
    """Evaluations, failures, generations and the best trial of a trials.jsonl (None when there is none)."""
    scored = [r for r in rows if r.get("fitness") is not None]
    if not scored:
        return None
    best = max(scored, key=lambda r: r["fitness"])  # the first of equals, as the search keeps it
    gens = fitness_by_generation(rows)[0]
    return {
        "evaluations": len(rows),
        "failed": len(rows) - len(scored),
        "generations": len(gens),
        "best_fitness": best["fitness"],
        "best_trial": best.get("trial"),
        "best_generation": best.get("generation"),
    }


def format_table(rows: Sequence[Mapping]) -> str:
    """A plain-text table: name, split, then every metric in order of first appearance."""
    columns = ["name", "split"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append(
            "  ".join((v.ljust(w) if i < 2 else v.rjust(w)) for i, (v, w) in enumerate(zip(r, widths)))
        )
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def write_report(
    run_dir: Path | str,
    rows: Sequence[Mapping],
    *,
    recipe: Recipe | None = None,
    depth: int | None = None,
    echo: bool = True,
) -> Path:
    """report.json (+ fitness.png from trials.jsonl, + recipe.png when recipe and depth are given)."""
    run_dir = Path(run_dir)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or not {"name", "split"} <= set(row):
            raise VlmergeError(f"report rows[{i}] = {row!r}: every row needs `name` and `split`")
    run_dir.mkdir(parents=True, exist_ok=True)
    report = {"rows": [dict(r) for r in rows], "search": search_summary(read_trials(run_dir))}
    path = run_dir / REPORT_JSON
    write_json(path, report)
    plot_fitness(run_dir)
    if recipe is not None and depth is not None:
        plot_recipe(recipe, depth, run_dir / "recipe.png")
    if echo:
        print(format_table(rows))
    return path
