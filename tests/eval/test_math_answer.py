"""Answer extraction, gold parsing and math accuracy, including the real MGSM-ja gold answers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from vlmerge.errors import VlmergeError
from vlmerge.eval.math_answer import extract_answer, extract_numbers, numbers_equal, parse_gold
from vlmerge.eval.metrics import METRICS, MathAccuracy, get_metric

MGSM_JA = Path(__file__).parents[2].parent / "shared" / "data" / "mgsm" / "mgsm_ja.tsv"

EXTRACTION = [
    ("5,600", 5600),  # the published EvoLLM-JP regex read 600
    ("1,234,567", 1234567),
    ("５６００", 5600),
    ("５，６００", 5600),
    ("１２．５", 12.5),
    ("-3", -3),
    ("−3", -3),  # U+2212 minus
    ("－3", -3),  # full-width hyphen-minus
    ("答えは-3です。", -3),
    ("x = -3", -3),
    ("10-3", 3),  # subtraction, not a negative number
    ("12.5", 12.5),
    ("0.75", 0.75),
    (".5", 0.5),
    ("12.", 12),  # trailing period is punctuation
    ("答えは12です。", 12),
    ("答えは１２です。", 12),
    ("12。", 12),
    ("$1,000", 1000),
    ("$1,000.", 1000),
    ("1,000円", 1000),
    ("¥1,000", 1000),
    ("1,000.50", 1000.5),
    ("The answer is 18.", 18),
    ("16 - 3 - 4 = 9, 9 * 2 = 18 なので、答えは18ドルです。", 18),
    ("first 1, then 2, finally 3", 3),
    ("12,34", 34),  # not a thousands group
    ("5、600", 600),  # Japanese list comma is not a thousands separator
    ("50%", 50),
    ("**18**", 18),
    (r"\boxed{42}", 42),
    ("3/4", 0.75),  # a simple fraction is its value
    ("答えは 3/4 です", 0.75),
    ("100万円", 100),  # kanji multipliers are not read
    ("no number here", None),
    ("答えはわかりません。", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACTION)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extraction_table_is_large():
    assert len(EXTRACTION) >= 30


def test_extract_numbers_in_order():
    assert extract_numbers("卵は16個、3個食べて4個使う。残り9個を2ドルで売ると18ドル。") == [
        16,
        3,
        4,
        9,
        2,
        18,
    ]


@pytest.mark.parametrize(
    ("gold", "value"),
    [("18", 18), ("5,600", 5600), ("276,000", 276000), (" 12.5 ", 12.5), (7, 7), ("-4", -4)],
)
def test_parse_gold(gold, value):
    assert parse_gold(gold) == value


@pytest.mark.parametrize("gold", ["", "abc", "12 apples", "1,2", "5,600,", "３個"])
def test_parse_gold_refuses_non_numbers(gold):
    with pytest.raises(VlmergeError, match="gold answer"):
        parse_gold(gold)


def test_numbers_equal():
    assert numbers_equal(0.1 + 0.2, 0.3)
    assert numbers_equal(5600, 5600.0)
    assert not numbers_equal(5600, 600)
    assert not numbers_equal(None, 0)


def test_math_accuracy_per_item():
    result = MathAccuracy()(
        ["答えは5,600です。", "The answer is 18.", "わかりません"], [["5,600"], ["18"], ["3"]]
    )
    assert result.values == pytest.approx({"acc": 2 / 3, "acc_ja": 1 / 3})
    first, second, third = result.per_item
    assert first == {
        "extracted": 5600,
        "gold": [5600],
        "correct": True,
        "is_japanese": True,
        "correct_ja": True,
    }
    assert second["correct"] and not second["is_japanese"] and not second["correct_ja"]
    assert third["extracted"] is None and not third["correct"]


def test_math_accuracy_names_the_bad_item():
    with pytest.raises(VlmergeError, match=r"item 1: gold answer 'twelve'"):
        MathAccuracy()(["1", "2"], ["1", "twelve"])


def test_registry():
    assert METRICS["math_accuracy"] is MathAccuracy
    assert isinstance(get_metric("math_accuracy"), MathAccuracy)
    with pytest.raises(VlmergeError, match="known metrics: coco_captions, math_accuracy, rouge_ja"):
        get_metric("bleu_ja")


@pytest.fixture(scope="module")
def mgsm_gold() -> list[str]:
    if not MGSM_JA.is_file():
        pytest.skip(f"{MGSM_JA} not present")
    with MGSM_JA.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert len(rows) == 250 and all(len(row) == 2 for row in rows)
    return [answer for _, answer in rows]


def test_mgsm_gold_answers_parse(mgsm_gold):
    values = [parse_gold(answer) for answer in mgsm_gold]
    assert len(values) == 250 and all(v == int(v) for v in values)
    assert 5600 in values  # "5,600" in the file


def test_mgsm_gold_as_predictions(mgsm_gold):
    references = [[answer] for answer in mgsm_gold]
    metric = MathAccuracy()
    assert metric(mgsm_gold, references).values["acc"] == 1.0
    japanese = metric([f"答えは{answer}です。" for answer in mgsm_gold], references).values
    assert japanese == {"acc": 1.0, "acc_ja": 1.0}
    english = metric([f"The answer is {answer}." for answer in mgsm_gold], references).values
    assert english == {"acc": 1.0, "acc_ja": 0.0}
    wrong = metric([f"答えは{parse_gold(a) + 1:.0f}です。" for a in mgsm_gold], references).values
    assert wrong == {"acc": 0.0, "acc_ja": 0.0}
