"""Japanese ROUGE against hand-computed LCS / n-gram overlap on MeCab tokens, gating, bootstrap median."""

from __future__ import annotations

from collections import Counter

import fugashi
import pytest
from rouge_score import rouge_scorer

from vlmerge.errors import VlmergeError
from vlmerge.eval.metrics import METRICS, MetricResult, RougeJa, get_metric
from vlmerge.eval.rouge import bootstrap_median, rouge_item

_TAGGER = fugashi.Tagger()


def mecab(text: str) -> list[str]:
    return [word.surface for word in _TAGGER(text)]


def f_measure(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def hand_rouge(prediction: str, reference: str) -> dict[str, float]:
    pred, ref = mecab(prediction), mecab(reference)
    scores = {"rougeL": f_measure(lcs_length(pred, ref), len(pred), len(ref))}
    for n in (1, 2):
        pred_ngrams = Counter(tuple(pred[i : i + n]) for i in range(len(pred) - n + 1))
        ref_ngrams = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
        overlap = sum((pred_ngrams & ref_ngrams).values())
        scores[f"rouge{n}"] = f_measure(overlap, sum(pred_ngrams.values()), sum(ref_ngrams.values()))
    return scores


PAIRS = [
    ("白い犬が公園で走っている", "黒い犬が公園を歩いている"),
    ("犬が走っている", "公園で犬と猫が遊んでいる"),
    ("猫が遊んでいる公園", "公園で犬と猫が遊んでいる"),
    ("赤い車が二台止まっています", "二台の赤い車"),
    ("車が止まっています", "赤い車が二台止まっています"),
]


def test_worked_example():
    # pred 白い|犬|が|公園|で|走っ|て|いる, ref 黒い|犬|が|公園|を|歩い|て|いる (8 tokens each)
    # unigrams in common: 犬 が 公園 て いる = 5 -> P = R = 5/8; bigrams: 犬が が公園 ている = 3 of 7 each;
    # LCS: 犬 が 公園 て いる = 5
    scores = rouge_item("白い犬が公園で走っている", ["黒い犬が公園を歩いている"])
    assert scores == pytest.approx({"rouge1": 5 / 8, "rouge2": 3 / 7, "rougeL": 5 / 8})


@pytest.mark.parametrize(("prediction", "reference"), PAIRS)
def test_rouge_matches_hand_computation(prediction, reference):
    assert rouge_item(prediction, [reference]) == pytest.approx(hand_rouge(prediction, reference))


def test_stock_rouge_score_sees_nothing_in_japanese():
    prediction, reference = PAIRS[0]
    stock = rouge_scorer.RougeScorer(["rouge1", "rougeL"]).score(reference, prediction)
    assert stock["rouge1"].fmeasure == 0.0 and stock["rougeL"].fmeasure == 0.0
    assert rouge_item(prediction, [reference])["rougeL"] > 0.5
    assert rouge_item(reference, [reference]) == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})


def test_normalisation_applies_before_scoring():
    assert rouge_item("ｶﾒﾗは１２台😀", ["カメラは12台"])["rougeL"] == pytest.approx(1.0)


def test_best_reference_per_item_and_mean_over_items():
    metric = RougeJa()
    predictions = [PAIRS[0][0], PAIRS[3][0]]
    references = [[PAIRS[1][1], PAIRS[0][1]], [PAIRS[3][1]]]
    result = metric(predictions, references)
    assert isinstance(result, MetricResult)
    first = max(hand_rouge(PAIRS[0][0], r)["rougeL"] for r in references[0])
    second = hand_rouge(*PAIRS[3])["rougeL"]
    assert result.per_item[0]["rougeL"] == pytest.approx(first)
    assert result.values["rougeL"] == pytest.approx(100 * (first + second) / 2)
    assert result.values["rougeL_ja"] == pytest.approx(result.values["rougeL"])  # all answers Japanese


def test_ja_variants_gate_non_japanese_predictions():
    predictions = ["12 cats", "猫が12匹", "OK"]
    references = [["猫が12匹"], ["猫が12匹"], ["OK"]]
    result = get_metric("rouge_ja")(predictions, references)
    first, second, third = result.per_item
    assert first["rouge1"] > 0 and first["rouge1_ja"] == 0.0 and first["gated"] and not first["is_japanese"]
    assert second["rougeL_ja"] == second["rougeL"] == pytest.approx(1.0)
    # an English reference does not gate (the EvoVLM-JP rule): "OK" for "OK" still scores
    assert not third["gated"] and third["rougeL_ja"] == pytest.approx(1.0)
    assert result.values["rouge1_ja"] < result.values["rouge1"]
    assert set(result.values) == {"rouge1", "rouge2", "rougeL", "exact",
                                  "rouge1_ja", "rouge2_ja", "rougeL_ja", "exact_ja"}
    assert [item["exact"] for item in result.per_item] == [0.0, 1.0, 1.0]
    assert result.values["exact"] == pytest.approx(200 / 3) and result.values["exact_ja"] == pytest.approx(200 / 3)


def test_exact_match_gives_no_credit_for_the_right_form_of_a_wrong_answer():
    predictions = ["1つ", "4つです。", " ４つ ", "赤い丸", "4 つ"]
    references = [["4つです。", "4つ"]] * 3 + [["赤い四角"], ["4つ"]]
    result = get_metric("rouge_ja")(predictions, references)
    assert [item["exact"] for item in result.per_item] == [0.0, 1.0, 1.0, 0.0, 1.0]  # NFKC, spacing, "。"
    assert result.per_item[0]["rougeL"] > 0  # ROUGE keeps the shared "つ"
    assert result.values["exact"] == pytest.approx(60.0)
    english = get_metric("rouge_ja")(["four"], [["4つ"]])
    assert english.per_item[0]["exact_ja"] == 0.0


def test_sakana_compatible_is_seeded():
    predictions = [p for p, _ in PAIRS] * 4
    references = [[r] for _, r in PAIRS] * 4
    first = RougeJa(sakana_compatible=True, seed=3)(predictions, references).values
    again = RougeJa(sakana_compatible=True, seed=3)(predictions, references).values
    other = RougeJa(sakana_compatible=True, seed=4)(predictions, references).values
    assert first == again
    assert first["rougeL"] != other["rougeL"]  # different resamples, different median
    plain = RougeJa()(predictions, references).values
    assert first["rougeL"] == pytest.approx(plain["rougeL"], abs=5.0)


def test_sakana_compatible_equals_mean_when_items_agree():
    predictions = [PAIRS[0][0]] * 7
    references = [[PAIRS[0][1]]] * 7
    sakana = RougeJa(sakana_compatible=True, n_bootstrap=50)(predictions, references).values
    plain = RougeJa()(predictions, references).values
    assert sakana["rougeL"] == pytest.approx(plain["rougeL"]) == pytest.approx(62.5)


def test_sakana_compatible_gates_english_answers_to_zero():
    predictions = ["A white dog is running in the park"] * 3
    references = [["白い犬が公園で走っている"]] * 3
    values = RougeJa(sakana_compatible=True)(predictions, references).values
    assert values["rougeL_ja"] == 0.0


def test_bootstrap_median_of_a_skewed_sample():
    scores = [0.0] * 9 + [1.0]
    assert bootstrap_median(scores, n_bootstrap=2000, seed=0) == pytest.approx(0.1, abs=0.05)
    assert bootstrap_median(scores, n_bootstrap=1, seed=0) in {k / 10 for k in range(11)}


def test_registry_and_bad_input():
    assert METRICS["rouge_ja"] is RougeJa
    with pytest.raises(VlmergeError, match="2 predictions but 1 reference"):
        RougeJa()(["a", "b"], [["a"]])
    with pytest.raises(VlmergeError, match=r"items \[1\] have no reference"):
        RougeJa()(["a", "b"], [["a"], []])
    with pytest.raises(VlmergeError, match="n_bootstrap"):
        get_metric("rouge_ja", n_bootstrap=0)
    with pytest.raises(VlmergeError, match="rouge_ja"):
        get_metric("rouge_ja", no_such_argument=1)
