"""COCO caption metrics on MeCab-tokenised Japanese; METEOR through its Java process."""

from __future__ import annotations

import pytest

from vlmerge.errors import VlmergeError
from vlmerge.eval.coco import MeteorScorer, coco_scores, pretokenize
from vlmerge.eval.metrics import METRICS, CocoCaptions, get_metric

REFERENCES = [
    ["白い犬が公園で走っている", "公園を走る白い犬"],
    ["猫がソファの上で寝ている"],
    ["赤い車が二台止まっています"],
    ["子供たちがボールで遊んでいる"],
]
GOOD = [refs[0] for refs in REFERENCES]
WORSE = ["犬がいる", "ソファがある", "車です", "男の人が立っている"]
KEYS = {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}


def test_pretokenize_splits_japanese_into_words():
    assert pretokenize("白い犬が公園で走っている") == "白い 犬 が 公園 で 走っ て いる"
    assert pretokenize("ＤＯＧ｜が走る") == "dog が 走る"  # normalised, lower-cased, METEOR separator dropped


def test_identical_captions_score_perfectly():
    result = get_metric("coco_captions", meteor=False)(GOOD, REFERENCES)
    assert set(result.values) == KEYS
    assert result.values["Bleu_1"] == pytest.approx(1.0, abs=1e-6)
    assert result.values["ROUGE_L"] == pytest.approx(1.0)
    assert result.values["CIDEr"] > 1.0
    assert result.per_item[0]["tokens"] == "白い 犬 が 公園 で 走っ て いる"
    assert all(item["ROUGE_L"] == pytest.approx(1.0) for item in result.per_item)


def test_worse_captions_score_lower():
    metric = CocoCaptions(meteor=False)
    good, worse = metric(GOOD, REFERENCES).values, metric(WORSE, REFERENCES).values
    for key in KEYS:
        assert worse[key] < good[key], key


def test_unsplit_japanese_would_give_no_cider():
    # what PTBTokenizer leaves: one "word" per caption, so a near-miss shares no n-gram with its reference
    gts = {i: [r.replace(" ", "") for r in refs] for i, refs in enumerate(REFERENCES)}
    near = {i: [caption + "よ"] for i, caption in enumerate(GOOD)}
    from pycocoevalcap.cider.cider import Cider

    assert Cider().compute_score(gts, near)[0] == 0.0
    tokenised = coco_scores([caption + "よ" for caption in GOOD], REFERENCES)[0]
    assert tokenised["CIDEr"] > 1.0


def test_meteor_through_java():
    metric = CocoCaptions(meteor=True)
    try:
        good, worse = metric(GOOD, REFERENCES), metric(WORSE, REFERENCES)  # one Java process for both calls
    finally:
        metric.close()
    assert good.values["METEOR"] == pytest.approx(1.0)
    assert all(item["METEOR"] == pytest.approx(1.0) for item in good.per_item)
    assert 0.0 <= worse.values["METEOR"] < good.values["METEOR"]


def test_meteor_failures_say_so():
    with pytest.raises(VlmergeError, match="METEOR needs Java: 'no-such-java'"):
        CocoCaptions(java="no-such-java")(GOOD, REFERENCES)
    with pytest.raises(VlmergeError, match=r"METEOR \(java -jar meteor-1.5.jar\) failed"):
        MeteorScorer(java="false").score(["犬"], [["犬"]])  # a "java" that exits at once


def test_registry_and_bad_input():
    assert METRICS["coco_captions"] is CocoCaptions
    with pytest.raises(VlmergeError, match="4 predictions but 3 reference"):
        CocoCaptions(meteor=False)(GOOD, REFERENCES[:3])
