"""Bad arguments to the toy commands are refused up front, naming the option and its value: before any set is
generated (splits), any model loads (vqa_probe), any model is trained (build) or any run starts (seeds)."""

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from vlmerge.errors import VlmergeError
from vlmerge.toy import build, seeds, splits, vqa_probe
from vlmerge.toy import problems as P

ROOT = Path(__file__).resolve().parents[2]
MODELS, DATA = ROOT / "eval_data" / "toy_models", ROOT / "eval_data" / "toy_vqa_ja"


def _never(*args, **kwargs):
    raise AssertionError("long work started before the arguments were checked")


# ---------------------------------------------------------------- splits


def _distinct_questions(config: P.ProblemConfig) -> int:
    """Every Japanese question text make_problems can draw, listed."""
    texts = set()
    for op in config.ops:
        lo, hi = config.factor_range if op == "×" else config.operand_range
        for a, b in itertools.product(range(lo, hi + 1), repeat=2):
            a, b = (a + b, a) if op == "-" else (a, b)
            for (name, other), item, t in itertools.product(itertools.permutations(P.NAMES, 2), P.ITEMS,
                                                            range(len(P.TEMPLATES[op]))):
                texts.add(P.question(P.Problem("x", op, a, b, name, other, item, t), "ja"))
    return len(texts)


@pytest.mark.parametrize("config", [P.ProblemConfig(), P.ProblemConfig(ops=("+", "-", "×")),
                                    P.ProblemConfig(operand_range=(0, 12), ops=("×", "-"), factor_range=(1, 1))])
def test_math_capacity_counts_every_distinct_question(config):
    assert splits.math_capacity(config) == _distinct_questions(config)


def test_vqa_capacity_counts_every_layout_and_question():
    # 4216608: the sum of len(S.question_specs(scene)) over all 25**4 - 1 layouts, listed once (5 s)
    assert splits.vqa_capacity() == 4216608


@pytest.mark.parametrize("sizes, culprit", [
    ({"math_search_size": 100000}, "math_search_size=100000 + math_heldout_size=512 = 100512: the toy world has "
                                   "only 12960 distinct math items"),
    ({"math_search_size": 12960, "math_heldout_size": 1}, "= 12961: the toy world has only 12960"),
    ({"math_heldout_size": 10**9}, "math_heldout_size=1000000000"),
    ({"vqa_search_size": 4216608}, "vqa_search_size=4216608 + vqa_heldout_size=512 = 4217120: the toy world has "
                                   "only 4216608 distinct vqa items"),
])
def test_sizes_beyond_the_toy_world_are_refused_arithmetically(sizes, culprit):
    with pytest.raises(VlmergeError) as err:
        splits.EvalSetConfig(**sizes)
    assert culprit in str(err.value)
    splits.EvalSetConfig(math_search_size=12959, math_heldout_size=1)  # the limit itself is allowed
    splits.EvalSetConfig(vqa_search_size=4216607, vqa_heldout_size=1)


@pytest.mark.parametrize("argv, culprit", [
    (["--math-search-size", "100000"], "math_search_size=100000"),
    (["--math-heldout-size", "20000"], "math_heldout_size=20000"),
    (["--vqa-heldout-size", "5000000"], "vqa_heldout_size=5000000"),
    (["--seed", "-1"], "seed=-1: must be 0 or more"),
    (["--canvas", "8"], "canvas=8: must be between 16 and 1024"),
    (["--canvas", "100000"], "canvas=100000: must be between 16 and 1024"),
])
def test_splits_main_refuses_before_generating(argv, culprit, tmp_path, monkeypatch):
    for name in ("vqa_splits", "math_splits"):
        monkeypatch.setattr(splits, name, _never)
    with pytest.raises(VlmergeError, match=culprit):
        splits.main(["--out", str(tmp_path / "out"), *argv])
    assert not (tmp_path / "out").exists()


def test_splits_command_refuses_a_huge_size_at_once(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vlmerge.toy.splits", "--out", str(tmp_path / "out"),
                           "--math-search-size", "100000"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: toy eval set math_search_size=100000")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- vqa_probe


@pytest.fixture
def no_model_loads(monkeypatch):
    monkeypatch.setattr(vqa_probe, "load_model", _never)


def test_probe_refuses_a_missing_merged_folder_before_loading_a_model(tmp_path, no_model_loads):
    missing = tmp_path / "missing"
    with pytest.raises(VlmergeError, match=f"--merged {missing}: not a folder"):
        vqa_probe.main(["--merged", str(missing), "--n", "2"])


def test_probe_refuses_a_merged_folder_that_is_no_vlm(tmp_path, no_model_loads):
    with pytest.raises(VlmergeError, match=f"--merged {tmp_path}: not a model folder: missing config.json"):
        vqa_probe.main(["--merged", str(tmp_path)])
    lm = MODELS / "lm_ja"
    with pytest.raises(VlmergeError, match=f"--merged {lm}: a text-only LM, not a VLM"):
        vqa_probe.main(["--merged", str(MODELS / "vlm_en"), str(lm)])


def test_probe_refuses_models_without_lm_ja_before_loading_vlm_en(tmp_path, no_model_loads):
    (tmp_path / "vlm_en").symlink_to(MODELS / "vlm_en")
    with pytest.raises(VlmergeError, match=f"--models {tmp_path}: {tmp_path / 'lm_ja'} is not a folder"):
        vqa_probe.main(["--models", str(tmp_path)])


@pytest.mark.parametrize("argv, culprit", [
    (["--threads", "0"], "--threads 0: must be at least 1"),
    (["--threads", "-4"], "--threads -4: must be at least 1"),
    (["--data", "/nonexistent/toy_vqa_ja"], "--data /nonexistent/toy_vqa_ja: not found"),
])
def test_probe_refuses_other_arguments(argv, culprit, no_model_loads):
    with pytest.raises(VlmergeError, match=culprit):
        vqa_probe.main(argv)


# ---------------------------------------------------------------- build and seeds


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_build_refuses_threads_before_building(threads, tmp_path, monkeypatch):
    monkeypatch.setattr(build, "build_models", _never)
    with pytest.raises(VlmergeError, match=f"--threads {threads}: must be at least 1"):
        build.main(["--out", str(tmp_path / "models"), "--threads", threads])
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("argv, culprit", [
    (["--jobs", "0"], "--jobs 0: must be at least 1"),
    (["--threads", "-1"], "--threads -1: must be at least 1"),
    (["--seeds", "0", "-1"], "--seeds -1: seeds must be between 0 and 2\\*\\*32 - 1"),
    (["--seeds", str(2**32)], f"--seeds {2**32}: "),
    (["--seeds", "0", "1", "0"], "--seeds 0 1 0: 0 given twice"),
    (["--merges", "ps", "dfs", "ps"], "--merges ps dfs ps: ps given twice"),
    (["--experiments", "toy_math_ja", "toy_math_ja"], "--experiments toy_math_ja toy_math_ja: toy_math_ja given"),
])
def test_seeds_refuses_before_any_run(argv, culprit, tmp_path, monkeypatch):
    monkeypatch.setattr(seeds, "run_one", _never)
    with pytest.raises(VlmergeError, match=culprit):
        seeds.main(["--out", str(tmp_path / "runs"), *argv])
    assert not (tmp_path / "runs").exists()
