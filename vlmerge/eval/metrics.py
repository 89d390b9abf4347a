"""The metric registry: one calling convention for every task's scorer.

    metric(predictions, references) -> MetricResult

`references[i]` holds the accepted answers of item i (a bare string counts as one answer). Metrics are
built by name (`get_metric("rouge_ja", sakana_compatible=True)`) or from a config node whose `_target_` is
the class; `primary` names the value a search maximises by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from vlmerge.errors import VlmergeError
from vlmerge.eval.math_answer import extract_answer, numbers_equal, parse_gold
from vlmerge.eval.rouge import rouge_ja
from vlmerge.eval.text import LanguageGate


@dataclass(frozen=True)
class MetricResult:
    """Aggregate values by name, and one dict per item (scores, extracted answer, language check ...)."""

    values: dict[str, float]
    per_item: list[dict] = field(default_factory=list)


def _checked(
    name: str, predictions: Sequence[str], references: Sequence[Sequence[str] | str]
) -> list[list[str]]:
    """References as lists of strings, after refusing mismatched, empty or non-text input in one message."""
    if len(predictions) != len(references):
        raise VlmergeError(
            f"{name}: {len(predictions)} predictions but {len(references)} reference lists; they must pair up"
        )
    if not predictions:
        raise VlmergeError(f"{name}: no items to score")
    bad = [i for i, p in enumerate(predictions) if not isinstance(p, str)]
    if bad:
        raise VlmergeError(f"{name}: predictions of items {bad[:10]} are not strings")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    empty = [i for i, r in enumerate(refs) if not r]
    if empty:
        raise VlmergeError(f"{name}: items {empty[:10]} have no reference")
    return refs


class RougeJa:
    """ROUGE-1/2/L F x100 on MeCab tokens and `exact` (% of answers equal to a reference), plus `*_ja`
    (non-Japanese predictions scored as empty).

    `sakana_compatible` aggregates by seeded bootstrap median as EvoVLM-JP reported (`rougeL_ja` is their
    figure); otherwise a plain mean. `fasttext_model`: a lid.176 file for the language gate instead of the
    script-based one.
    """

    primary = "rougeL_ja"

    def __init__(
        self,
        sakana_compatible: bool = False,
        n_bootstrap: int = 1000,
        seed: int = 0,
        fasttext_model: str | None = None,
    ):
        if n_bootstrap < 1:
            raise VlmergeError(f"rouge_ja: n_bootstrap must be >= 1, got {n_bootstrap}")
        self.sakana_compatible = sakana_compatible
        self.n_bootstrap = n_bootstrap
        self.seed = seed
        self.gate = LanguageGate(fasttext_model)

    def __call__(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> MetricResult:
        refs = _checked("rouge_ja", predictions, references)
        report = rouge_ja(
            predictions,
            refs,
            is_japanese=self.gate,
            sakana_compatible=self.sakana_compatible,
            n_bootstrap=self.n_bootstrap,
            seed=self.seed,
        )
        return MetricResult(values=report.values, per_item=report.per_item)


class MathAccuracy:
    """Accuracy of the last number in each response against the gold answer(s).

    `acc_ja` also requires the response to be Japanese (the EvoLLM-JP MGSM-JA figure).
    """

    primary = "acc_ja"

    def __init__(self, fasttext_model: str | None = None):
        self.gate = LanguageGate(fasttext_model)

    def __call__(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> MetricResult:
        refs = _checked("math_accuracy", predictions, references)
        per_item = []
        for i, (response, golds) in enumerate(zip(predictions, refs)):
            try:
                gold_values = [parse_gold(g) for g in golds]
            except VlmergeError as err:
                raise VlmergeError(f"math_accuracy: item {i}: {err}") from None
            extracted = extract_answer(response)
            correct = any(numbers_equal(extracted, g) for g in gold_values)
            japanese = self.gate(response)
            per_item.append(
                {
                    "extracted": extracted,
                    "gold": gold_values,
                    "correct": correct,
                    "is_japanese": japanese,
                    "correct_ja": correct and japanese,
                }
            )
        n = len(per_item)
        values = {
            "acc": sum(item["correct"] for item in per_item) / n,
            "acc_ja": sum(item["correct_ja"] for item in per_item) / n,
        }
        return MetricResult(values=values, per_item=per_item)


class CocoCaptions:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr-D on MeCab-tokenised Japanese, on pycocoevalcap's scale.

    Scale: 0..1, CIDEr-D 0..10. `meteor=False` skips the Java METEOR scorer (start-up ~10 s; the process is
    reused across calls).
    """

    primary = "CIDEr"

    def __init__(self, meteor: bool = True, java: str = "java"):
        from vlmerge.eval.coco import MeteorScorer  # pycocoevalcap: needed by this metric only

        self.meteor = MeteorScorer(java=java) if meteor else None

    def __call__(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> MetricResult:
        refs = _checked("coco_captions", predictions, references)
        from vlmerge.eval.coco import coco_scores

        values, per_item = coco_scores(predictions, refs, meteor=self.meteor)
        return MetricResult(values=values, per_item=per_item)

    def close(self) -> None:
        """Stop the METEOR Java process now rather than at garbage collection."""
        if self.meteor is not None:
            self.meteor.close()


METRICS: dict[str, type] = {
    "rouge_ja": RougeJa,
    "math_accuracy": MathAccuracy,
    "coco_captions": CocoCaptions,
}


def get_metric(name: str, **kwargs):
    """A metric instance by registry name; unknown names are refused with the list of known ones."""
    if name not in METRICS:
        raise VlmergeError(f"unknown metric {name!r}; known metrics: {', '.join(sorted(METRICS))}")
    try:
        return METRICS[name](**kwargs)
    except TypeError as err:
        raise VlmergeError(f"metric {name!r}: bad arguments {sorted(kwargs)}: {err}") from err
