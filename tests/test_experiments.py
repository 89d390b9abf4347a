"""The reference experiments: composed with the paper's settings, and run on tiny stand-ins through overrides."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.fixtures.hf_models import make_finetune
from tests.test_run import vlmerge, write_math, write_vqa
from vlmerge.cli import config_dir
from vlmerge.dfs.search import merge_kind


def composed(*overrides: str) -> dict:
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


def test_default_experiment_is_the_toy_vqa_world():
    cfg = composed()
    assert cfg["name"] == "toy_vqa_ja"
    assert cfg["pool"]["target"]["path"].endswith("eval_data/toy_models/vlm_en")
    assert cfg["task"]["fitness_key"] == "rougeL_ja"
    assert merge_kind(cfg["merge"]) == "ps_dfs" and cfg["merge"]["op"] == "dare_ties"
    assert {k: cfg["merge"]["path"][k] for k in ("repeats", "scaling", "margin")} == {
        "repeats": 2, "scaling": "per_target", "margin": 0.25}
    assert cfg["merge"]["ps"]["budget"] == cfg["search"]["budget"] == 120
    ps_alone = composed("merge=ties_dare")["merge"]  # the PS search alone: no DFS keys left behind
    assert merge_kind(ps_alone) == "ps" and "path" not in ps_alone and "ps" not in ps_alone


@pytest.mark.parametrize("experiment", ["evovlm_jp", "evollm_jp"])
def test_reference_experiments_use_the_papers_settings(experiment):
    cfg = composed(f"experiment={experiment}")
    assert cfg["pool"]["base"]["path"] == "mistralai/Mistral-7B-v0.1"
    assert cfg["merge"]["op"] == "dare_ties"  # PS = TIES sign consensus + DARE
    assert cfg["merge"]["genome"]["params"] == ["weight", "density"]
    assert cfg["merge"]["genome"]["groups"] == "layer"
    assert cfg["search"]["sigma0"] == pytest.approx(1 / 6) and cfg["search"]["popsize"] is None
    assert cfg["search"]["budget"] == 1000
    if experiment == "evovlm_jp":
        assert cfg["pool"]["target"]["path"] == "llava-hf/llava-v1.6-mistral-7b-hf"
        assert cfg["pool"]["donors"] == {"ja": {"path": "augmxnt/shisa-gamma-7b-v1", "dtype": "float16",
                                                "device": "cuda"}}  # fmt: skip
        task = cfg["task"]
        assert task["data"] == "SakanaAI/JA-VG-VQA-500" and task["num_beams"] == 5
        assert task["repetition_penalty"] == 1.5 and task["max_new_tokens"] == 512
        assert "与えられた画像を下に、質問に答えてください。" in task["prompt"]
    else:
        assert set(cfg["pool"]["donors"]) == {"wizardmath", "abel"}
        assert cfg["task"]["data"] == "SakanaAI/gsm8k-ja-test_250-1319"  # fitness
        assert cfg["heldout_task"]["data"].endswith("mgsm/mgsm_ja.tsv")  # held out
        assert "一歩一歩考えましょう。" in cfg["task"]["prompt"]


def stand_in(role: str, path, device: str = "cpu") -> list[str]:
    return [f"{role}.path={path}", f"{role}.device={device}", f"{role}.dtype=float32"]


def test_evovlm_jp_runs_on_tiny_stand_ins(tiny, tmp_path):
    data = write_vqa(tmp_path / "vqa")
    run_dir = tmp_path / "run"
    vlmerge("experiment=evovlm_jp", *stand_in("pool.target", tiny.llava_next), *stand_in("pool.donors.ja", tiny.ja),
            *stand_in("pool.base", tiny.base), "task.loader=vqa_jsonl", f"task.data={data}", "task.revision=null",
            "task.loader_options=null", "task.max_new_tokens=3", "task.num_beams=2", "search.budget=3",
            "search.popsize=3", f"hydra.run.dir={run_dir}")  # fmt: skip
    rows = json.loads((run_dir / "report.json").read_text())["rows"]
    assert rows[-1]["name"] == "evolved" and "rougeL_ja" in rows[-1]
    assert (run_dir / "best" / "config.json").is_file()


def test_evollm_jp_runs_on_tiny_stand_ins(tiny, tmp_path):
    abel = make_finetune(tiny.base, tmp_path / "abel", seed=11)
    data = write_math(tmp_path / "math")
    tsv = tmp_path / "mgsm_ja.tsv"
    tsv.write_text("".join(f"{i} + {i}\t{2 * i}\n" for i in range(3)))
    run_dir = tmp_path / "run"
    vlmerge("experiment=evollm_jp", *stand_in("pool.target", tiny.ja), *stand_in("pool.donors.wizardmath", tiny.math),
            *stand_in("pool.donors.abel", abel), *stand_in("pool.base", tiny.base), "task.loader=math_jsonl",
            f"task.data={data}", "task.revision=null", "task.max_new_tokens=3", "task.stop=[]",
            f"heldout_task.data={tsv}", "heldout_task.max_new_tokens=3", "heldout_task.stop=[]",
            "search.budget=3", "search.popsize=3", f"hydra.run.dir={run_dir}")  # fmt: skip
    rows = json.loads((run_dir / "report.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["target", "wizardmath", "abel", "linear", "ties", "dare_ties", "evolved"]
    assert all(r["split"] == "test" and "acc_ja" in r for r in rows)  # MGSM's only split, held out
    assert (run_dir / "recipe.mergekit.yaml").is_file()
