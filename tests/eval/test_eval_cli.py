"""`vlmerge-eval` on tiny random models of every family and on the shipped toy sets; predictions; bad data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from PIL import Image

from vlmerge.errors import VlmergeError
from vlmerge.eval.command import eval_command
from vlmerge.merge.command import export_recipe, open_pool, read_recipe_file

REPO = Path(__file__).resolve().parents[2]
TOY_VQA = REPO / "eval_data" / "toy_vqa_ja"
TOY_MATH = REPO / "eval_data" / "toy_math_ja"


def run_eval(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="eval_cli", overrides=["progress=false", *overrides])
    return eval_command(cfg)


def read_outputs(out: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "report.json").read_text())


def split_ids(folder: Path, split: str, limit: int) -> list[str]:
    lines = (folder / f"{split}.jsonl").read_text().splitlines()
    return [json.loads(line)["id"] for line in lines[:limit]]


def vqa_set(root: Path, images: dict[str, bytes | None]) -> Path:
    """A one-split VQA folder whose items point at `images` (None: the file is left out)."""
    (root / "images").mkdir(parents=True)
    lines = []
    for i, (name, data) in enumerate(images.items()):
        if data is not None:
            (root / "images" / name).write_bytes(data)
        lines.append(
            {"id": f"q{i}", "image": f"images/{name}", "question": "赤 は いくつ", "answers": ["一"]}
        )
    (root / "search.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    return root


def png() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("family", ["llava", "llava_next", "composite"])
def test_vlms_on_the_toy_vqa_set(tiny, tmp_path, family):
    out = tmp_path / "out"
    result = run_eval(
        f"model={getattr(tiny, family)}",
        "task=toy_vqa_ja",
        f"task.data={TOY_VQA}",
        "split=search",
        "task.limit=4",
        "task.batch_size=3",
        f"output_dir={out}",
    )
    rows, report = read_outputs(out)
    assert [r["id"] for r in rows] == split_ids(TOY_VQA, "search", 4)
    assert [r["prediction"] for r in rows] == list(result.predictions)
    assert all("\n" not in r["prediction"] and r["output"] is not None for r in rows)
    assert report["task"] == "toy_vqa_ja" and report["split"] == "search" and report["n_items"] == 4
    assert report["model"] == str(getattr(tiny, family)) and report["fitness_key"] == "rougeL_ja"
    assert set(report["values"]) >= {"rouge1", "rougeL", "rougeL_ja"} and report["seconds"] >= 0
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl", "report.json"]  # no temp files


def test_causal_lm_on_the_toy_math_set_and_rescoring_its_predictions(tiny, tmp_path):
    out = tmp_path / "out"
    result = run_eval(
        f"model={tiny.base}", "task=toy_math_ja", f"task.data={TOY_MATH}", "task.limit=5", f"output_dir={out}"
    )
    rows, report = read_outputs(out)
    assert report["split"] == "heldout" and [r["id"] for r in rows] == split_ids(TOY_MATH, "heldout", 5)
    assert set(report["values"]) == {"acc", "acc_ja"}
    assert [r["scores"]["correct"] for r in rows] == [s["correct"] for s in result.metric.per_item]
    rescored = run_eval(
        f"predictions={out / 'predictions.jsonl'}",
        "task=toy_math_ja",
        f"task.data={TOY_MATH}",
        "task.limit=5",
        f"output_dir={tmp_path / 're'}",
    )
    assert rescored.values == result.values and rescored.predictions == result.predictions
    assert read_outputs(tmp_path / "re")[1]["predictions_file"] == str(out / "predictions.jsonl")


def test_predictions_file_with_unknown_or_missing_ids(tmp_path):
    ids = split_ids(TOY_MATH, "search", 3)
    path = tmp_path / "p.jsonl"
    path.write_text(
        "".join(json.dumps({"id": i, "prediction": "答えは3です。"}) + "\n" for i in ids[1:] + ["zz"])
    )
    with pytest.raises(VlmergeError, match=rf"1 id\(s\) not in the split: zz.*no prediction: {ids[0]}"):
        run_eval(
            f"predictions={path}", "task=toy_math_ja", f"task.data={TOY_MATH}", "task.limit=3", "split=search"
        )
    path.write_text('{"id": "a", "prediction": "1"}\n{"id": "a", "prediction": "2"}\n')
    with pytest.raises(VlmergeError, match="duplicate id"):
        run_eval(f"predictions={path}", "task=toy_math_ja", f"task.data={TOY_MATH}")
    path.write_text('{"id": "a"}\n')
    with pytest.raises(VlmergeError, match=r"p\.jsonl:1: expected an object"):
        run_eval(f"predictions={path}", "task=toy_math_ja", f"task.data={TOY_MATH}")
    path.write_bytes(b'{"id": "a", "prediction": "1"}\n{"id": "b", "prediction": "\xff"}\n')
    with pytest.raises(VlmergeError) as err:
        run_eval(f"predictions={path}", "task=toy_math_ja", f"task.data={TOY_MATH}")
    assert str(err.value) == f"{path}:2: not UTF-8 text (byte 0xff); save the file as UTF-8"


def test_bad_images_refused_before_loading_or_skipped(tiny, tmp_path):
    data = vqa_set(tmp_path / "d", {"a.png": png(), "b.png": b"garbage", "c.png": None, "d.png": png()})
    out = tmp_path / "out"
    common = ("task=toy_vqa_ja", f"task.data={data}", "split=search", f"output_dir={out}")
    with pytest.raises(VlmergeError, match=r"2 item\(s\).*q1.*q2"):
        run_eval("model=/nonexistent/model", *common)  # the data is refused before the model is looked at
    assert not out.exists()
    result = run_eval(f"model={tiny.llava}", *common, "task.skip_bad_items=true")
    rows, report = read_outputs(out)
    assert report["n_skipped"] == 2 and report["skipped_ids"] == ["q1", "q2"] == list(result.skipped)
    assert [(r["prediction"], r["skipped"]) for r in rows[1:3]] == [("", True), ("", True)]
    assert [r["skipped"] for r in rows] == [False, True, True, False]


def test_bad_command_lines(tiny, tmp_path):
    task = ("task=toy_math_ja", f"task.data={TOY_MATH}")
    with pytest.raises(VlmergeError, match="exactly one of model="):
        run_eval(*task)
    with pytest.raises(VlmergeError, match="got model, predictions"):
        run_eval(f"model={tiny.base}", f"predictions={tmp_path / 'p.jsonl'}", *task)
    with pytest.raises(VlmergeError, match="predictions file not found: missing.jsonl"):
        run_eval("predictions=missing.jsonl", *task)
    with pytest.raises(VlmergeError, match="model dir not found"):
        run_eval("model=./missing-model", *task)
    with pytest.raises(VlmergeError, match="unknown metric"):
        run_eval(f"model={tiny.base}", *task, "task.metric=bleu")
    tsv = tmp_path / "m.tsv"
    tsv.write_text("1 + 1 は？\t2\n")
    with pytest.raises(VlmergeError, match="declares no search split"):
        run_eval(f"model={tiny.base}", "task=mgsm_ja", f"task.data={tsv}", "split=search")
    with pytest.raises(VlmergeError, match="unknown device 'tpu9'"):
        run_eval(f"model={tiny.base}", *task, "device=tpu9")
    with pytest.raises(VlmergeError, match="choose a task: task=NAME, one of .*toy_math_ja"):
        run_eval(f"model={tiny.base}")


def test_corrupt_or_truncated_weights_are_named_as_the_merge_names_them(tiny, tmp_path):
    broken = shutil.copytree(tiny.base, tmp_path / "broken")
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    out = tmp_path / "out"
    common = ("task=toy_math_ja", f"task.data={TOY_MATH}", "task.limit=2", f"output_dir={out}")
    for damaged in (data[: len(data) // 2], b"\x00" * 64):
        weights.write_bytes(damaged)
        with pytest.raises(VlmergeError, match=rf"^corrupt or truncated safetensors file {weights}: Error while"):
            run_eval(f"model={broken}", *common)
        assert not out.exists()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", "from vlmerge.cli import eval_main; eval_main()", f"model={broken}",
                           *common], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("error:") == 1 and "Traceback" not in done.stderr
    assert f"error: corrupt or truncated safetensors file {weights}: Error while" in done.stderr
    assert not out.exists()


def test_recipe_without_models_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("op: linear\nsources: [target]\n")
    with pytest.raises(VlmergeError, match="names no models"):
        run_eval(f"recipe={recipe}", "task=toy_math_ja", f"task.data={TOY_MATH}")


def test_recipe_in_memory_scores_like_the_exported_model(tiny, tmp_path):
    pool = {"target": {"path": str(tiny.llava)}, "donors": {"ja": {"path": str(tiny.ja)}},
            "base": {"path": str(tiny.base)}}  # fmt: skip
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump({"op": "ties", "sources": ["target", "ja"], "seed": 3, "pool": pool,
                        "rules": [{"weight": 0.6, "density": 0.5}, {"source": "ja", "weight": 1.2}]})
    )  # fmt: skip
    task = ("task=toy_vqa_ja", f"task.data={TOY_VQA}", "split=search", "task.limit=6")
    in_memory = run_eval(f"recipe={recipe}", *task, f"output_dir={tmp_path / 'r'}")
    exported = export_recipe(open_pool(pool, verbose=False), read_recipe_file(recipe)[0], tmp_path / "merged")
    on_disk = run_eval(f"model={exported}", *task)
    plain = run_eval(f"model={tiny.llava}", *task)
    assert in_memory.outputs == on_disk.outputs and in_memory.values == on_disk.values
    assert in_memory.outputs != plain.outputs  # the recipe was applied
    report = read_outputs(tmp_path / "r")[1]
    assert report["recipe"] == str(recipe) and report["model"] == str(tiny.llava)
    recipe.write_text(yaml.safe_dump({"op": "ties", "sources": ["target"], "pool": pool}))
    with pytest.raises(VlmergeError, match="do not match the pool's sources"):
        run_eval(f"recipe={recipe}", *task)


def test_console_script_runs_and_leaves_no_hydra_outputs(tiny, tmp_path):
    script = shutil.which("vlmerge-eval", path=str(Path(sys.executable).parent))
    assert script is not None, "the vlmerge-eval console script is not installed in this environment"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            script,
            f"model={tiny.base}",
            "task=toy_math_ja",
            f"task.data={TOY_MATH}",
            "task.limit=3",
            "output_dir=out",
            "progress=false",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "acc_ja" in done.stdout and "<- fitness" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no outputs/, no .hydra/
    assert read_outputs(tmp_path / "out")[1]["n_items"] == 3
    unknown = subprocess.run(
        [script, "model=x", "task=nope"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert unknown.returncode != 0 and "task/nope" in unknown.stderr and "toy_vqa_ja" in unknown.stderr
