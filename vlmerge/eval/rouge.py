"""Japanese ROUGE: rouge_score on MeCab word tokens, per-item max over references, mean or bootstrap median.

rouge_score's default tokenizer keeps only [a-z0-9], so Japanese would score 0; it is given our tokenizer.
The EvoVLM-JP figure is the *bootstrap median* (rouge_score's BootstrapAggregator "mid") of ROUGE-L F x 100
with non-Japanese answers replaced by ""; `sakana_compatible` reproduces that estimator with a seeded RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from rouge_score import rouge_scorer

from vlmerge.eval.text import ja_tokens, normalize_ja

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
SCORE_TYPES = (*ROUGE_TYPES, "exact")
"""Per-item scores: the ROUGE F-measures and `exact` (1 when the answer is one of the references, 0 if not)."""


class MecabRougeTokenizer:
    """The tokenizer object rouge_score expects: `tokenize(text) -> list[str]` (normalised MeCab surfaces)."""

    @staticmethod
    @lru_cache(maxsize=65536)
    def _tokens(text: str) -> tuple[str, ...]:
        return tuple(ja_tokens(normalize_ja(text)))

    def tokenize(self, text: str) -> list[str]:
        return list(self._tokens(text))


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=MecabRougeTokenizer())


def rouge_item(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L F-measure (0..1) of one prediction, each the max over the item's references."""
    best = _scorer().score_multi(list(references), prediction)
    return {name: float(best[name].fmeasure) for name in ROUGE_TYPES}


def exact_item(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the prediction equals one of the references up to normalisation (NFKC, spacing) and a final
    "。" or "."; ROUGE gives partial credit for a wrong answer in the right form ("1つ" for "4つ"), this does not."""
    key = _answer_key(prediction)
    return float(any(key == _answer_key(r) for r in references))


def _answer_key(text: str) -> str:
    return normalize_ja(text).rstrip("。.").strip()


def bootstrap_median(scores: Sequence[float], *, n_bootstrap: int = 1000, seed: int = 0) -> float:
    """Median over `n_bootstrap` resamples (items drawn with replacement) of the mean score.

    The estimator of rouge_score's BootstrapAggregator `mid`, but seeded: a rerun gives the same figure.
    """
    values = np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(n_bootstrap)
    for i in range(n_bootstrap):
        means[i] = values[rng.integers(0, len(values), size=len(values))].mean()
    return float(np.percentile(means, 50))


@dataclass(frozen=True)
class RougeReport:
    """Aggregates (x100) and per-item scores; `*_ja` keys are scored after the Japanese gate."""

    values: dict[str, float]
    per_item: list[dict]


def rouge_ja(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    is_japanese: Callable[[str], bool],
    sakana_compatible: bool = False,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> RougeReport:
    """Plain and Japanese-gated ROUGE (and exact match) over items.

    The gate follows EvoVLM-JP: where an item's reference is Japanese and the prediction is not, the
    prediction is scored as "" (0). Aggregate: plain mean x100, or with `sakana_compatible` the bootstrap
    median x100.
    """
    per_item = []
    for prediction, refs in zip(predictions, references):
        plain = {**rouge_item(prediction, refs), "exact": exact_item(prediction, refs)}
        prediction_ja = is_japanese(prediction)
        gated = not prediction_ja and any(is_japanese(r) for r in refs)
        gated_scores = {name: 0.0 for name in SCORE_TYPES} if gated else plain
        per_item.append(
            {
                **plain,
                **{f"{name}_ja": value for name, value in gated_scores.items()},
                "is_japanese": prediction_ja,
                "gated": gated,
            }
        )
    keys = [*SCORE_TYPES, *(f"{name}_ja" for name in SCORE_TYPES)]
    values = {}
    for key in keys:
        scores = [item[key] for item in per_item]
        if sakana_compatible:
            values[key] = 100.0 * bootstrap_median(scores, n_bootstrap=n_bootstrap, seed=seed)
        else:
            values[key] = 100.0 * float(np.mean(scores))
    return RougeReport(values=values, per_item=per_item)
