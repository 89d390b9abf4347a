"""The toy build's math-world options (the committed world uses them): a base and a Japanese LM that solve small
word problems, bare sums after documents, a Japanese LM without reading questions."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from vlmerge.errors import VlmergeError
from vlmerge.eval.text import is_japanese
from vlmerge.toy.build import DEFAULT, JAPANESE_CUE, _plain, build_models, japanese_examples, reader_examples, with_sums

from .test_train import MICRO

COMMITTED = Path(__file__).resolve().parents[2] / "eval_data" / "toy_models"
WORKED = re.compile(r" (\d+) ([+-]) (\d+) = (\d+)(?:\. The answer is (\d+)\.|。答えは(\d+)です。)$")


def _worked(e) -> tuple[int, str, int, int]:
    m = WORKED.match(e.completion)
    assert m, e.completion
    a, op, b, n = int(m[1]), m[2], int(m[3]), int(m[4])
    assert n == (a + b if op == "+" else a - b) == int(m[5] or m[6])
    return a, op, b, n


def test_the_committed_models_were_built_with_the_default_config():
    built_with = json.loads((COMMITTED / "MANIFEST.json").read_text())["config"]
    assert built_with == _plain(asdict(DEFAULT))
    assert DEFAULT.solve_fraction > 0 and DEFAULT.sum_fraction > 0 and DEFAULT.ja_solve_fraction > 0
    assert not DEFAULT.ja_reading


def test_base_solves_small_problems_in_both_languages_in_place_of_reading_questions():
    plain = reader_examples(3000, 4, reading_fraction=0.5, cue_fraction=0.3)
    mixed = reader_examples(3000, 4, reading_fraction=0.5, cue_fraction=0.3, solve_fraction=0.6,
                            solve_cue_fraction=0.5, solve_operands=(1, 3))
    unchanged = ("text_qa",)
    assert [e for e in plain if e.task in unchanged] == [e for e in mixed if e.task in unchanged]
    solved = [e for e in mixed if e.task == "solve"]
    slots = sum(e.task == "reading" for e in plain)
    assert 0.5 < len(solved) / slots < 0.7
    cued = [e for e in solved if e.prompt.endswith("\n" + JAPANESE_CUE)]
    assert 0.4 < len(cued) / len(solved) < 0.6
    for e in solved:
        assert e.prompt.startswith("Q: ") and e.prompt.endswith(("\nA:", "\n" + JAPANESE_CUE))
        assert is_japanese(e.completion) == (e in cued) == (e.lang == "ja")
        a, op, b, _ = _worked(e)
        assert (1 <= b <= 3 and 1 <= a - b <= 3) if op == "-" else (1 <= a <= 3 and 1 <= b <= 3)
    assert {is_japanese(e.prompt) for e in cued} == {is_japanese(e.prompt) for e in solved} == {True, False}


def test_japanese_lm_can_drop_reading_questions_and_solve_small_problems_in_japanese():
    examples = japanese_examples(2000, 3, True, "echo", reading=False, solve_fraction=0.3, solve_operands=(2, 4))
    assert not any(e.task == "reading" for e in examples)
    solved = [e for e in examples if e.task == "solve"]
    assert 0.2 < len(solved) / len(examples) < 0.4
    for e in solved:
        assert e.prompt.startswith("Q: ") and e.prompt.endswith("\nA:") and is_japanese(e.prompt)
        assert is_japanese(e.completion) and e.completion.endswith("です。")
        a, op, b, _ = _worked(e)
        assert 2 <= b <= 4 and 2 <= (a - b if op == "-" else a) <= 4
    assert japanese_examples(500, 3, True, "echo", solve_fraction=0.0) == japanese_examples(500, 3, True, "echo")


def test_with_sums_appends_a_right_bare_sum_to_a_share_of_documents():
    docs = [f"doc {i}" for i in range(2000)]
    assert with_sums(docs, 1, 0.0) is docs
    out = with_sums(docs, 1, 0.25)
    assert out == with_sums(docs, 1, 0.25) and len(out) == len(docs)
    summed = [d for d in out if "\n" in d]
    assert 0.2 < len(summed) / len(docs) < 0.3
    for before, after in zip(docs, out):
        assert after.startswith(before)
        if after != before:
            a, op, b, n = re.fullmatch(r"\n(\d+) ([+-]) (\d) = (\d+)", after[len(before):]).groups()
            assert int(n) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_math_options_change_the_models_and_bad_values_are_named():
    options = replace(MICRO, solve_fraction=0.8, sum_fraction=0.5, ja_reading=False, ja_solve_fraction=0.5,
                      reading_fraction=0.8)
    plain, varied = build_models(MICRO, verbose=False), build_models(options, verbose=False)
    for name in ("base", "lm_ja"):
        weight = "model.layers.1.mlp.down_proj.weight"
        assert not torch.equal(plain[name].state_dict()[weight], varied[name].state_dict()[weight]), name
    for field, value in (("solve_fraction", 1.5), ("sum_fraction", -0.1), ("ja_solve_fraction", 2.0)):
        with pytest.raises(VlmergeError, match=field):
            replace(MICRO, **{field: value})
    with pytest.raises(VlmergeError, match=r"ja_solve_operands=\(5, 2\)"):
        replace(MICRO, ja_solve_operands=(5, 2))
