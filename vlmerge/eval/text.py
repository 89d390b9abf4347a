"""Japanese text handling shared by the metrics: normalisation, MeCab word tokens, a Japanese-language gate.

The normalisation follows what the EvoVLM-JP evaluation did before scoring (emoji removal, then neologdn),
re-written here so that no neologdn build is needed: NFKC for full/half width, one spelling for hyphens and
long-vowel marks, tildes dropped, spaces between Japanese characters dropped.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from vlmerge.errors import VlmergeError

_EMOJI = re.compile(
    "["
    "\U0001f000-\U0001faff"  # mahjong .. symbols & pictographs ext-A (incl. skin tones, flags)
    "\U0001fc00-\U0001fffd"
    "\U000e0020-\U000e007f"  # tag characters of flag sequences
    "\u2600-\u2604\u2607-\u2668\u2670-\u26ff"  # miscellaneous symbols, keeping ★☆ and the music signs
    "\u2700-\u27bf"  # dingbats
    "\u2b05-\u2b07\u2b1b\u2b1c\u2b50\u2b55"
    "\u231a\u231b\u2328\u23cf\u23e9-\u23f3\u23f8-\u23fa"
    "\u3297\u3299"  # ㊗ ㊙ (NFKC would turn them into kanji otherwise)
    "\u200d\ufe0e\ufe0f\u20e3"  # zero-width joiner, variation selectors, keycap
    "]+"
)
_HYPHENS = re.compile("[\u02d7\u058a\u2010\u2011\u2012\u2013\u2043\u207b\u208b\u2212]")
_LONG_VOWELS = re.compile("[\ufe63\u2014\u2015\u2500\u2501\u30fc\uff70]+")
_TILDES = re.compile("[~\u223c\u223e\u301c\u3030\uff5e]")
_JA_CLASS = (
    "\u3000-\u303f\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\uff01-\uff60\uffe0-\uffe6"
)
_SPACE_BETWEEN_JA = re.compile(
    f"(?<=[{_JA_CLASS}]) (?=[{_JA_CLASS}A-Za-z0-9])|(?<=[A-Za-z0-9]) (?=[{_JA_CLASS}])"
)
_WHITESPACE = re.compile(r"\s+")


def remove_emoji(text: str) -> str:
    """Drop emoji (pictographs, flags, dingbats, joiners) but keep ★☆♪, which are ordinary Japanese text."""
    return _EMOJI.sub("", text)


def normalize_ja(text: str) -> str:
    """Emoji removal + neologdn-style normalisation, so width and spelling variants tokenise alike."""
    text = unicodedata.normalize("NFKC", remove_emoji(text))
    text = _HYPHENS.sub("-", text)
    text = _LONG_VOWELS.sub("ー", text)
    text = _TILDES.sub("", text)
    text = _WHITESPACE.sub(" ", text).strip()
    return _SPACE_BETWEEN_JA.sub("", text)


_TAGGER = None


def _tagger():
    """One MeCab tagger per process, built on first use (loading the dictionary takes a moment)."""
    global _TAGGER
    if _TAGGER is None:
        try:
            import fugashi

            _TAGGER = fugashi.Tagger()
        except (ImportError, RuntimeError) as err:
            raise VlmergeError(
                f"MeCab tokenisation needs fugashi with a dictionary ({err}); "
                "run: pip install fugashi unidic-lite"
            ) from err
    return _TAGGER


def ja_tokens(text: str) -> list[str]:
    """MeCab (unidic-lite) word surfaces: Japanese has no spaces, so ROUGE/BLEU need real word boundaries."""
    if not text.strip():
        return []
    return [word.surface for word in _tagger()(text)]


def _is_japanese_char(char: str) -> bool:
    code = ord(char)
    return (
        0x3040 <= code <= 0x30FF  # hiragana, katakana (incl. ー)
        or 0x31F0 <= code <= 0x31FF
        or 0x3400 <= code <= 0x4DBF
        or 0x4E00 <= code <= 0x9FFF
        or 0xF900 <= code <= 0xFAFF
        or 0x20000 <= code <= 0x2FFFF
        or char in "々〆〇ヶ"
    )


def _is_kana(char: str) -> bool:
    return 0x3040 <= ord(char) <= 0x30FF or 0x31F0 <= ord(char) <= 0x31FF


# Japanese prose practically always carries kana; a long kana-free run of ideographs is Chinese.
MAX_KANJI_WITHOUT_KANA = 12


def japanese_ratio(text: str) -> float:
    """Share of Japanese characters among letter units; a run of other letters (a Latin word) counts once.

    Counting a Latin word as one unit, not one per letter, keeps "iPhoneを使います" Japanese.
    """
    text = unicodedata.normalize("NFKC", text)
    japanese = other_words = 0
    in_other_word = False
    for char in text:
        if _is_japanese_char(char):
            japanese += 1
            in_other_word = False
        elif unicodedata.category(char).startswith("L"):
            other_words += 0 if in_other_word else 1
            in_other_word = True
        else:
            in_other_word = False
    units = japanese + other_words
    return japanese / units if units else 0.0


def is_japanese(text: str, *, min_ratio: float = 0.5) -> bool:
    """Script-based language check: enough kana/kanji among the letters, and not kana-free Chinese.

    Text without letters ("18", "") is not Japanese, as a fastText language id would also say.
    """
    if japanese_ratio(text) < min_ratio:
        return False
    kana = sum(_is_kana(c) for c in text)
    kanji = sum(_is_japanese_char(c) and not _is_kana(c) for c in text)
    return kana > 0 or kanji <= MAX_KANJI_WITHOUT_KANA


class LanguageGate:
    """Decides whether a response counts as Japanese: script-based, or fastText lid when a model is given.

    The fastText path reproduces the EvoLLM-JP / EvoVLM-JP gate (`__label__ja` probability >= threshold on
    lid.176); `fasttext` is imported only then, so the default needs no extra package.
    """

    def __init__(self, fasttext_model: str | None = None, *, min_ratio: float = 0.5, threshold: float = 0.5):
        self.fasttext_model = fasttext_model
        self.min_ratio = min_ratio
        self.threshold = threshold
        self._model = None if fasttext_model is None else _load_fasttext(Path(fasttext_model))

    @property
    def method(self) -> str:
        return "script" if self._model is None else "fasttext"

    def __call__(self, text: str) -> bool:
        if self._model is None:
            return is_japanese(text, min_ratio=self.min_ratio)
        labels, probs = self._model.predict(text.replace("\n", " "), k=-1)
        return dict(zip(labels, probs)).get("__label__ja", 0.0) >= self.threshold


def _load_fasttext(path: Path):
    try:
        import fasttext
    except ImportError as err:
        raise VlmergeError(
            f"language gate: fasttext_model={str(path)!r} needs the fasttext package (not installed); "
            "run: pip install fasttext-wheel (or drop fasttext_model to use the script-based gate)"
        ) from err
    if not path.is_file():
        raise VlmergeError(f"language gate: fastText model file {str(path)!r} does not exist")
    try:
        return fasttext.load_model(str(path))
    except ValueError as err:
        raise VlmergeError(f"language gate: cannot load fastText model {str(path)!r}: {err}") from err
