"""`python -m vlmerge` end to end on tiny random models: every output file, best/ == what was scored (PS:
vlmerge-merge(recipe); DFS: the exported path), and DFS runs killed mid-search resume to the straight run."""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from vlmerge.cli import config_dir
from vlmerge.search.checkpoint import CHECKPOINT, read_trials


def write_vqa(folder, n: int = 4, heldout_n: int | None = None):
    (folder / "images").mkdir(parents=True)
    for split, count in (("search", n), ("heldout", heldout_n or n)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(count):
                name = f"images/{split}{i}.png"
                Image.new("RGB", (32, 32), ["red", "blue"][i % 2]).save(folder / name)
                answer = ["赤 です", "青 です"][i % 2]
                item = {"id": f"{split}{i}", "image": name, "question": "what colour is the circle",
                        "answers": [answer]}  # fmt: skip
                f.write(json.dumps(item) + "\n")
    return folder


def write_math(folder, n: int = 4, heldout_n: int | None = None):
    folder.mkdir(parents=True)
    for split, count in (("search", n), ("heldout", heldout_n or n)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(count):
                item = {"id": f"{split}{i}", "question": f"{i} + {i}", "answer": str(2 * i)}
                f.write(json.dumps(item) + "\n")
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
    args = [f"pool.target.path={tiny.composite}", f"pool.donors.ja.path={tiny.ja}",
            f"pool.base.path={tiny.base}", f"task.data={data}", "task.max_new_tokens=3", "task.stop=[]",
            "merge=ties_dare", "search.budget=6", "search.popsize=3", "merge.genome.groups=2",
            f"hydra.run.dir={run_dir}"]  # fmt: skip  (PS alone: the toy default adds a DFS stage)
    done = vlmerge(*args)
    return run_dir, done, args


def test_search_writes_every_output(vqa_run):
    run_dir, done, _ = vqa_run
    for name in ("trials.jsonl", "checkpoint.pkl", "recipe.yaml", "report.json", "fitness.png", "recipe.png",
                 "best/vlmerge_composite.json",
                 "best/language_model/model.safetensors.index.json"):  # fmt: skip
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


@pytest.mark.parametrize("table_split", ["heldout", "search"])
def test_text_path_runs_through_the_same_code_and_writes_mergekit_yaml(tiny, tmp_path, table_split):
    data = write_math(tmp_path / "math")
    run_dir = tmp_path / "run"
    vlmerge("experiment=toy_math_ja", f"pool.target.path={tiny.ja}", f"pool.donors.math.path={tiny.math}",
            f"pool.base.path={tiny.base}", f"task.data={data}", "task.max_new_tokens=3", "task.stop=[]",
            "search.budget=4", "search.popsize=2", "merge.genome.groups=model", f"table_split={table_split}",
            f"hydra.run.dir={run_dir}")  # fmt: skip
    assert (run_dir / "recipe.mergekit.yaml").is_file()
    rows = json.loads((run_dir / "report.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["target", "math", "linear", "ties", "dare_ties", "evolved"]
    assert all("acc_ja" in r and r["split"] == table_split for r in rows)


# ---- DFS: merge=dfs (VQA, a LLaVA target) and merge=ps_dfs (math), straight and killed + resumed ----

def killed_mid_generation(args: list[str], run_dir: Path, popsize: int) -> list[dict]:
    """Start `python -m vlmerge ARGS`; SIGKILL it while a generation after the run dir's first checkpoint is
    half evaluated (1 .. popsize-1 of its trials logged). Returns the trials logged at the kill."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        command = [sys.executable, "-m", "vlmerge", *args]
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / CHECKPOINT).exists():
                done = pickle.loads((run_dir / CHECKPOINT).read_bytes())["evaluations"]
                if done + 1 <= len(read_trials(run_dir)) <= done + popsize - 1:
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.005)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (run_dir.parent / f"{run_dir.name}.log").read_text()[-3000:]
    at_kill = read_trials(run_dir)
    assert len(at_kill) > pickle.loads((run_dir / CHECKPOINT).read_bytes())["evaluations"]  # mid-generation
    return at_kill


def searched(rows: list[dict]) -> list[tuple]:
    return [(r["generation"], r["index"], r["x"], r["fitness"], r["recipe"]) for r in rows]


def same_run(a: Path, b: Path) -> None:
    """Two run dirs hold the same search, best path, best/ tensors and held-out table."""
    assert searched(read_trials(a)) == searched(read_trials(b))
    assert (a / "path.yaml").read_text() == (b / "path.yaml").read_text()
    first, second = tensors(a / "best"), tensors(b / "best")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((a / "report.json").read_text()) == json.loads((b / "report.json").read_text())


DFS_POPSIZE = 4


@pytest.fixture(scope="module")
def dfs_vqa_run(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("run_dfs_vqa")
    data = write_vqa(root / "vqa", n=8, heldout_n=4)
    args = ["merge=dfs", f"pool.target.path={tiny.llava}", f"pool.donors.ja.path={tiny.ja}",
            f"pool.base.path={tiny.base}", f"task.data={data}", "task.max_new_tokens=3", "task.stop=[]",
            "task.batch_size=1", "search.budget=14", f"search.popsize={DFS_POPSIZE}", "merge.path.repeats=2",
            "merge.path.scaling=tower_pair", "merge.path.margin=0.2"]  # fmt: skip
    vlmerge(*args, f"hydra.run.dir={root / 'run'}")
    return root / "run", args


def test_dfs_search_writes_its_outputs_and_best_is_the_scored_model(dfs_vqa_run):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlmerge.dfs.path import LayerPath
    from vlmerge.eval.evaluator import evaluate
    from vlmerge.eval.loading import load_model
    from vlmerge.eval.task import instantiate_task
    from vlmerge.search.checkpoint import BEST

    run_dir, args = dfs_vqa_run
    for name in ("trials.jsonl", "checkpoint.pkl", "best.json", "path.yaml", "report.json", "fitness.png",
                 "best/config.json", "best/vlmerge_dfs_path.yaml"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "recipe.yaml").exists() and not (run_dir / "ps").exists()
    trials = read_trials(run_dir)
    assert [t["generation"] for t in trials] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 2
    assert any(t["recipe"]["layers"] != ["A0", "A1", "A2", "A3"] for t in trials)  # the search moved layers
    path = LayerPath.from_dict(yaml.safe_load((run_dir / "path.yaml").read_text()))
    best = json.loads((run_dir / BEST).read_text())
    assert LayerPath.from_dict(best["recipe"]) == path
    assert best["fitness"] == max(t["fitness"] for t in trials)
    rows = json.loads((run_dir / "report.json").read_text())["rows"]
    names = ["target", "ja", "tower_swap_ja", "linear", "ties", "dare_ties", "evolved"]
    assert [r["name"] for r in rows] == names
    assert rows[-1]["kind"] == "evolved" and rows[-1]["merge"] == "dfs"

    model = LlavaForConditionalGeneration.from_pretrained(run_dir / "best").eval()  # its ordinary class
    depth = len(model.model.language_model.layers)
    assert model.config.text_config.num_hidden_layers == len(path.layers) == depth
    processor = AutoProcessor.from_pretrained(run_dir / "best")
    batch = processor(text=["<image> what colour is the circle"], images=[Image.new("RGB", (32, 32), "red")],
                      return_tensors="pt")  # fmt: skip
    out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[-1] == batch["input_ids"].shape[-1] + 4
    # the held-out row of the evolved merge is what the exported model scores
    task_overrides = [a for a in args if a.startswith("task.")]
    with initialize_config_dir(config_dir(), version_base="1.3"):
        task_cfg = OmegaConf.to_container(compose("config", overrides=task_overrides).task, resolve=True)
    bundle = load_model({"path": str(run_dir / "best"), "dtype": "float32", "device": "cpu"})
    scored = evaluate(bundle, instantiate_task(task_cfg), "heldout")
    assert {k: round(v, 4) for k, v in scored.values.items()} == {k: rows[-1][k] for k in scored.values}


def test_dfs_search_killed_mid_generation_resumes_to_the_straight_result(dfs_vqa_run, tmp_path):
    straight, args = dfs_vqa_run
    run_dir = tmp_path / "run"
    at_kill = killed_mid_generation([*args, f"hydra.run.dir={run_dir}"], run_dir, DFS_POPSIZE)
    assert not (run_dir / "best").exists()
    done = vlmerge(*args, f"hydra.run.dir={run_dir}", "resume=true")
    assert "DFS search: 14 evaluations" in done.stdout
    same_run(run_dir, straight)
    assert searched(read_trials(run_dir))[: len(at_kill)] == searched(at_kill)


@pytest.fixture(scope="module")
def ps_dfs_math_run(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("run_ps_dfs_math")
    data = write_math(root / "math", n=8, heldout_n=4)
    args = ["experiment=toy_math_ja", "merge=ps_dfs", f"pool.target.path={tiny.ja}",
            f"pool.donors.math.path={tiny.math}", f"pool.base.path={tiny.base}", f"task.data={data}",
            "task.max_new_tokens=3", "task.stop=[]", "task.batch_size=1", "merge.genome.groups=model",
            "merge.ps.budget=5", "merge.ps.popsize=2", "search.budget=10", f"search.popsize={DFS_POPSIZE}",
            "merge.path.repeats=2", "merge.path.scaling=per_target", "merge.path.margin=0.2"]  # fmt: skip
    vlmerge(*args, f"hydra.run.dir={root / 'run'}")
    return root / "run", args


def test_ps_dfs_runs_ps_then_dfs_over_the_ps_merge(ps_dfs_math_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from vlmerge.dfs.export import export_path
    from vlmerge.dfs.model import PathModel
    from vlmerge.dfs.path import LayerPath
    from vlmerge.merge.command import export_recipe, open_pool
    from vlmerge.merge.recipe import load_recipe

    run_dir, _ = ps_dfs_math_run
    ps = run_dir / "ps"
    for name in ("trials.jsonl", "checkpoint.pkl", "best.json", "recipe.yaml", "report.json", "fitness.png",
                 "recipe.png"):  # fmt: skip
        assert (ps / name).is_file(), name
    assert [t["generation"] for t in read_trials(ps)] == [0, 0, 1, 1, 2]  # merge.ps.budget / popsize
    assert [t["generation"] for t in read_trials(run_dir)] == [0] * 4 + [1] * 4 + [2] * 2  # search.*
    assert "op" in read_trials(ps)[0]["recipe"] and "layers" in read_trials(run_dir)[0]["recipe"]
    assert load_recipe(run_dir / "tower_a.yaml") == load_recipe(ps / "recipe.yaml")
    rows = json.loads((run_dir / "report.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["target", "math", "linear", "ties", "dare_ties", "ps", "evolved"]
    assert (rows[-2]["merge"], rows[-1]["merge"]) == ("ps", "ps_dfs") and all("acc_ja" in r for r in rows)

    # best/ = the path exported over tower A = the PS recipe merged (by vlmerge-merge's exporter)
    recipe = load_recipe(ps / "recipe.yaml")
    merged = export_recipe(open_pool(recipe.pool, verbose=False), recipe, tmp_path / "ps_merged")
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    path = LayerPath.from_dict(yaml.safe_load((run_dir / "path.yaml").read_text()))
    again = export_path(PathModel(model, recipe.pool["donors"]["math"]["path"]), path, tmp_path / "again",
                        target=merged)  # fmt: skip
    best, expected = tensors(run_dir / "best"), tensors(again)
    assert best.keys() == expected.keys() and all(torch.equal(best[k], expected[k]) for k in best)
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "best").eval()
    assert exported.config.num_hidden_layers == len(path.layers)
    ids = torch.tensor([[1, 5, 6, 7]])
    assert exported.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 7)


def test_ps_dfs_killed_in_the_dfs_stage_resumes_it_without_redoing_ps(ps_dfs_math_run, tmp_path):
    straight, args = ps_dfs_math_run
    run_dir = tmp_path / "run"
    killed_mid_generation([*args, f"hydra.run.dir={run_dir}"], run_dir, DFS_POPSIZE)
    ps_rows = read_trials(run_dir / "ps")
    vlmerge(*args, f"hydra.run.dir={run_dir}", "resume=true")
    assert read_trials(run_dir / "ps") == ps_rows  # every PS trial reused as logged (timings included)
    assert searched(ps_rows) == searched(read_trials(straight / "ps"))
    assert (run_dir / "ps" / "recipe.yaml").read_text() == (straight / "ps" / "recipe.yaml").read_text()
    same_run(run_dir, straight)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["search.budget=0"], "search.budget = 0: must be >= 1"),  # raised inside Hydra's instantiate
        (["seed=-1"], "search.seed = -1: must be an integer in 0..2**32-1"),  # numpy refused it mid-search
        (["merge=ps_dfs", "merge.path.repeats=99"], "repeats"),  # the DFS stage's genome, before PS runs
        (["merge=ps_dfs", "merge.donor=nope"], "nope"),
        (["table_split=trainn"], "trainn"),  # the final table's split, before the search and not after it
        (["task.data=/nope/math"], "/nope/math"),
    ],
)
def test_bad_search_settings_end_in_one_line_before_any_search(tiny, tmp_path, overrides, message):
    data = write_math(tmp_path / "math")
    run_dir = tmp_path / "run"
    args = ["experiment=toy_math_ja", f"pool.target.path={tiny.ja}", f"pool.donors.math.path={tiny.math}",
            f"pool.base.path={tiny.base}", f"task.data={data}", *overrides, f"hydra.run.dir={run_dir}"]
    done = subprocess.run([sys.executable, "-m", "vlmerge", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("error:") == 1 and message in done.stderr and "Traceback" not in done.stderr
    assert not list(run_dir.rglob("trials.jsonl"))


def test_multirun_sweep_gives_each_job_its_own_run_dir(tiny, tmp_path):
    data = write_math(tmp_path / "math")
    sweep = tmp_path / "sweep"
    vlmerge("-m", "experiment=toy_math_ja", f"pool.target.path={tiny.ja}", f"pool.donors.math.path={tiny.math}",
            f"pool.base.path={tiny.base}", f"task.data={data}", "task.max_new_tokens=2", "task.stop=[]",
            "search.budget=2", "search.popsize=2", "merge.genome.groups=model", "heldout=false", "seed=0,1",
            f"hydra.sweep.dir={sweep}")  # fmt: skip
    runs = sorted(p.parent for p in sweep.rglob("trials.jsonl"))
    assert len(runs) == 2 and runs[0] != runs[1]
    assert {json.loads((r / "best.json").read_text())["x"] != [] for r in runs} == {True}
    assert all((r / "recipe.yaml").is_file() for r in runs)
