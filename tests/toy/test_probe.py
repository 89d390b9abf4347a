"""The toy probe on the committed models: each source's skill, per language, before any merge."""

import subprocess
import sys
from pathlib import Path

import pytest

from vlmerge.errors import VlmergeError
from vlmerge.toy import problems as P
from vlmerge.toy.probe import decoy, main, probe_folders, table

MODELS = Path(__file__).resolve().parents[2] / "eval_data" / "toy_models"


def test_probe_measures_the_math_lms_english_skill(capsys):
    results = probe_folders(MODELS, ["lm_math_en"], n=16)
    assert [(r.folder, r.lang) for r in results] == [("lm_math_en", "en"), ("lm_math_en", "ja")]
    english, japanese = results
    assert english.acc >= 0.75 and english.set_up >= 0.75 and english.japanese == 0.0
    assert english.from_sum >= 0.75  # given "7 + 1 =" after an English problem, it writes 8
    assert japanese.japanese <= 0.1 and japanese.acc >= 0.25  # it solves Japanese problems too, in English
    assert japanese.from_sum >= 0.5  # and finishes most sums written after them
    assert english.follows_sum + english.from_text <= 1.0  # one next number: the decoy's value or the answer
    assert english.follows_sum > english.from_text  # after another written sum it mostly computes that one
    keys = ("acc", "set_up", "japanese", "from_sum", "follows_sum", "from_text")
    assert all(0.0 <= getattr(r, key) <= 1.0 for r in results for key in keys)
    assert english.example.endswith(".") and "The answer is" in english.example
    text = table(results)
    assert text.splitlines()[0].split()[:8] == ["model", "lang", *keys]
    assert len(text.splitlines()) == 3


def test_probe_refuses_missing_models_and_empty_runs(tmp_path):
    with pytest.raises(VlmergeError, match="nowhere"):
        probe_folders(tmp_path, ["nowhere"], n=4)
    with pytest.raises(VlmergeError, match="--n 0"):
        probe_folders(MODELS, ["lm_math_en"], n=0)
    with pytest.raises(VlmergeError, match="lm_ja"):
        main(["--models", str(tmp_path), "--folders", "lm_ja"])


def test_probe_command_ends_bad_input_with_one_error_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vlmerge.toy.probe", "--models", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: toy probe: no model in")


def test_probe_seed_picks_another_problem_stream(capsys):
    main(["--folders", "lm_math_en", "--n", "4"])
    default = capsys.readouterr().out.splitlines()
    main(["--folders", "lm_math_en", "--n", "4", "--seed", "90003"])
    validation = capsys.readouterr().out.splitlines()
    assert len(default) == len(validation) == 3
    assert default[1].split()[-6:] != validation[1].split()[-6:]  # the first reply: another problem


def test_decoy_is_another_sum_of_the_same_operation_drawn_like_the_problems():
    problems = P.make_problems(300, 5, P.ProblemConfig(ops=("+", "-", "×")))
    decoys = [decoy(p) for p in problems]
    assert decoys == [decoy(p) for p in problems]  # seeded by the problem id
    for p, d in zip(problems, decoys):
        assert (d.op, d.name, d.item, d.template) == (p.op, p.name, p.item, p.template) and d.answer != p.answer
        if p.op == "×":
            assert 2 <= d.a <= 5 and 2 <= d.b <= 5
        else:
            assert 1 <= (d.a if p.op == "+" else d.b) <= 9 and 1 <= (d.b if p.op == "+" else d.a - d.b) <= 9
    assert len({(d.a, d.b) for d in decoys}) > 50


def test_probe_refuses_zero_threads():
    with pytest.raises(VlmergeError, match="--threads 0"):
        main(["--threads", "0"])
