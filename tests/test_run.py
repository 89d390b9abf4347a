"""`python -m vlmerge` end to end on tiny random models: every output file, and best/ == vlmerge-merge(recipe)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlmerge.search.checkpoint import read_trials


def write_vqa(folder, n: int = 4):
    (folder / "images").mkdir(parents=True)
    for split in ("search", "heldout"):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(n):
                name = f"images/{split}{i}.png"
                Image.new("RGB", (32, 32), ["red", "blue"][i % 2]).save(folder / name)
                answer = ["赤 です", "青 です"][i % 2]
                f.write(json.dumps({"id": f"{split}{i}", "image": name, "question": "what colour is the circle",
                                    "answers": [answer]}) + "\n")  # fmt: skip
    return folder


def write_math(folder, n: int = 4):
    folder.mkdir(parents=True)
    for split in ("search", "heldout"):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"id": f"{split}{i}", "question": f"{i} + {i}", "answer": str(2 * i)}) + "\n")
    return folder


def vlmerge(*args: str, script: str | None = None) -> subprocess.CompletedProcess:
    """`python -m vlmerge ARGS`, or a console script (vlmerge-merge) installed beside this interpreter."""
    command = [str(Path(sys.executable).parent / script)] if script else [sys.executable, "-m", "vlmerge"]
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def tensors(folder):
    state = {}
    for file in sorted(folder.rglob("*.safetensors")):
        state.update({f"{file.parent.relative_to(folder)}/{k}": v for k, v in load_file(file).items()})
    return state


@pytest.fixture(scope="module")
def vqa_run(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("run_vqa")
    data = write_vqa(root / "vqa")
    run_dir = root / "run"
    args = [f"pool.target.path={tiny.composite}", f"pool.donors.ja.path={tiny.ja}", f"pool.base.path={tiny.base}",
            f"task.data={data}", "task.max_new_tokens=3", "task.stop=[]", "search.budget=6", "search.popsize=3",
            "merge.genome.groups=2", f"hydra.run.dir={run_dir}"]  # fmt: skip
    done = vlmerge(*args)
    return run_dir, done, args


def test_search_writes_every_output(vqa_run):
    run_dir, done, _ = vqa_run
    for name in ("trials.jsonl", "checkpoint.pkl", "recipe.yaml", "report.json", "fitness.png", "recipe.png",
                 "best/vlmerge_composite.json", "best/language_model/model.safetensors.index.json"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    trials = read_trials(run_dir)
    assert [t["generation"] for t in trials] == [0, 0, 0, 1, 1, 1]
    assert all("recipe" in t and "fitness" in t and "seconds" in t for t in trials)
    report = json.loads((run_dir / "report.json").read_text())
    names = [row["name"] for row in report["rows"]]
    assert names == ["target", "ja", "tower_swap_ja", "linear", "ties", "dare_ties", "evolved"]
    assert all(row["split"] == "heldout" and "rougeL_ja" in row for row in report["rows"])
    assert "evolved" in done.stdout and "rougeL" in done.stdout  # the printed table


def test_best_equals_reapplying_recipe_with_vlmerge_merge(vqa_run, tmp_path):
    run_dir, _, _ = vqa_run
    out = tmp_path / "again"
    vlmerge(f"recipe={run_dir / 'recipe.yaml'}", f"output_dir={out}", script="vlmerge-merge")
    best, again = tensors(run_dir / "best"), tensors(out)
    assert best.keys() == again.keys()
    for key in best:
        assert torch.equal(best[key], again[key]), key


def test_text_path_runs_through_the_same_code_and_writes_mergekit_yaml(tiny, tmp_path):
    data = write_math(tmp_path / "math")
    run_dir = tmp_path / "run"
    vlmerge("experiment=toy_math_ja", f"pool.target.path={tiny.ja}", f"pool.donors.math.path={tiny.math}",
            f"pool.base.path={tiny.base}", f"task.data={data}", "task.max_new_tokens=3", "task.stop=[]",
            "search.budget=4", "search.popsize=2", "merge.genome.groups=model", f"hydra.run.dir={run_dir}")  # fmt: skip
    assert (run_dir / "recipe.mergekit.yaml").is_file()
    rows = json.loads((run_dir / "report.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["target", "math", "linear", "ties", "dare_ties", "evolved"]
    assert all("acc_ja" in r for r in rows)
