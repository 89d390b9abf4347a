"""Run the toy experiments over several seeds and print the held-out table as mean and spread (README's table).

    python -m vlmerge.toy.seeds --out outputs/toy_seeds                      # PS, both toy experiments, seeds 0 1 2
    python -m vlmerge.toy.seeds --merges ps ps_dfs dfs --jobs 6 --threads 2  # PS+DFS and DFS rows too

Each (experiment, merge, seed) is one ordinary `python -m vlmerge` run in its own folder under --out (so a
row can be inspected or resumed there); `--jobs` runs go side by side, each with `--threads` torch threads.
A finished run (report.json present) is not run again. Extra Hydra overrides go after `--`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vlmerge.errors import VlmergeError, exit_on_user_error
from vlmerge.user_input import blocking_file

METRICS = {"toy_vqa_ja": (("rougeL_ja", 1.0), ("exact_ja", 1.0)), "toy_math_ja": (("acc_ja", 100.0),)}
"""Held-out values summarised per experiment, (report key, scale to points): ROUGE-L gives partial credit for
the right form of a wrong answer, exact match does not."""


def run_dir(out: Path, experiment: str, merge: str, seed: int) -> Path:
    return out / f"{experiment}-{merge}-seed{seed}"


MERGE_CONFIGS = {"ps": "ties_dare", "dfs": "dfs_compact", "ps_dfs": "ps_dfs_compact"}
"""Row label -> conf/merge file. The DFS genome is the compact one (24 slots, one scaling per layer entered): the
paper's full 12x12 W is 144 genes, too many for a 120-evaluation search. toy_vqa_ja runs ps_dfs by default,
toy_math_ja ps."""


def command(experiment: str, merge: str, seed: int, folder: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "vlmerge", f"experiment={experiment}", f"seed={seed}", f"hydra.run.dir={folder}",
            f"merge={MERGE_CONFIGS[merge]}", *extra]


def run_one(job: tuple, threads: int) -> tuple[tuple, int]:
    experiment, merge, seed, folder, extra = job
    if (folder / "report.json").is_file():
        return job, 0
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    with open(folder / "stdout.log", "w") as log:
        code = subprocess.run(command(experiment, merge, seed, folder, extra), stdout=log,
                              stderr=subprocess.STDOUT, env=env).returncode
    return job, code


def table(out: Path, experiments: list[str], merges: list[str], seeds: list[int]) -> str:
    """Rows (model name, merge) -> 'key mean (min..max, n=...)' per metric, over the seeds whose report.json
    exists (a metric that a report lacks is left out of that row's count)."""
    lines = []
    for experiment in experiments:
        lines.append(f"{experiment} (held-out, seeds {' '.join(map(str, seeds))})")
        values: dict[str, dict[str, list[float]]] = {}
        for merge in merges:
            for seed in seeds:
                report = run_dir(out, experiment, merge, seed) / "report.json"
                if not report.is_file():
                    continue
                for row in json.loads(report.read_text())["rows"]:
                    if row.get("kind", "").startswith(("evolved", "stage")):
                        name = f"{row['name']} ({merge})"
                    elif merge == merges[0]:
                        name = row["name"]  # sources and baselines: from the first merge's runs only
                    else:
                        continue
                    for key, scale in METRICS[experiment]:
                        if key in row:
                            values.setdefault(name, {}).setdefault(key, []).append(scale * row[key])
        for name, by_key in values.items():
            cells = []
            for key, vals in by_key.items():
                spread = f"{min(vals):.1f}..{max(vals):.1f}" if len(vals) > 1 else "-"
                cells.append(f"{key} {statistics.mean(vals):6.1f} ({spread}, n={len(vals)})")
            lines.append(f"  {name:24s} " + "   ".join(cells))
    return "\n".join(lines)


def check_arguments(args: argparse.Namespace) -> None:
    """Before any run starts: counts of at least 1, seeds numpy accepts, and no run named twice (two runs of
    one folder side by side would write over each other)."""
    for name in ("jobs", "threads"):
        if getattr(args, name) < 1:
            raise VlmergeError(f"--{name} {getattr(args, name)}: must be at least 1")
    bad = [seed for seed in args.seeds if not 0 <= seed < 2**32]
    if bad:
        raise VlmergeError(f"--seeds {bad[0]}: seeds must be between 0 and 2**32 - 1")
    for name in ("experiments", "merges", "seeds"):
        values = getattr(args, name)
        twice = sorted({v for v in values if values.count(v) > 1}, key=values.index)
        if twice:
            raise VlmergeError(f"--{name} {' '.join(map(str, values))}: {', '.join(map(str, twice))} given twice")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m vlmerge.toy.seeds", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/toy_seeds")
    parser.add_argument("--experiments", nargs="+", default=list(METRICS), choices=list(METRICS))
    parser.add_argument("--merges", nargs="+", default=["ps"], choices=list(MERGE_CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    check_arguments(args)
    out = Path(args.out)
    jobs = [(e, m, s, run_dir(out, e, m, s), extra) for e in args.experiments for m in args.merges
            for s in args.seeds]
    for job in jobs:  # before any run starts: each run folder must be (or be creatable as) a folder
        blocking = blocking_file(job[3])
        if blocking is not None:
            raise VlmergeError(f"--out {out}: {blocking} exists and is not a directory; choose another --out")
    with ThreadPoolExecutor(args.jobs) as pool:
        failed = [job for job, code in pool.map(lambda j: run_one(j, args.threads), jobs) if code]
    print(table(out, args.experiments, args.merges, args.seeds))
    if failed:
        names = ", ".join(str(job[3]) for job in failed)
        raise SystemExit(f"error: {len(failed)} run(s) failed, see stdout.log in: {names}")


if __name__ == "__main__":
    exit_on_user_error(main)
