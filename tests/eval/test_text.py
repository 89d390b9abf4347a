"""Normalisation, MeCab tokens and the Japanese-language gate."""

from __future__ import annotations

import importlib.util

import pytest

from vlmerge.errors import VlmergeError
from vlmerge.eval.text import LanguageGate, is_japanese, ja_tokens, japanese_ratio, normalize_ja, remove_emoji


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("ＡＢＣ１２３", "ABC123"),  # full-width Latin and digits -> half width
        ("ｱｲｳｴｵ", "アイウエオ"),  # half-width katakana -> full width
        ("ｳｪｰｰｰｰｰ", "ウェー"),  # repeated long-vowel marks collapse
        ("すごーーーい", "すごーい"),
        ("わ〜い～", "わい"),  # tildes dropped, as neologdn does
        ("ラーメン—うまい", "ラーメンーうまい"),  # dash variants become the long-vowel mark
        ("5−3‐2–1", "5-3-2-1"),  # hyphen/minus variants become "-"
        ("検索 エンジン 自作 入門 を 買い ました", "検索エンジン自作入門を買いました"),
        (
            "南アルプスの　天然水　Ｓｐａｒｋｉｎｇ　Ｌｅｍｏｎ　レモン",
            "南アルプスの天然水Sparking Lemonレモン",
        ),
        ("  犬が\n\n走る  ", "犬が走る"),
        ("犬🐶が走る😀👍🏽", "犬が走る"),  # emoji, including skin-tone modifiers
        ("🇯🇵日本", "日本"),  # flags
        ("星★☆と音符♪", "星★☆と音符♪"),  # ordinary Japanese symbols are kept
    ],
)
def test_normalize_ja(raw, expected):
    assert normalize_ja(raw) == expected


def test_remove_emoji_leaves_text_alone():
    assert remove_emoji("❤️ありがとう🙏") == "ありがとう"
    assert remove_emoji("答えは12です。") == "答えは12です。"


def test_ja_tokens_are_mecab_words():
    assert ja_tokens("答えは12です。") == ["答え", "は", "12", "です", "。"]
    assert ja_tokens("白い犬が公園で走っている") == ["白い", "犬", "が", "公園", "で", "走っ", "て", "いる"]
    assert ja_tokens("") == []
    assert ja_tokens("  ") == []


def test_width_variants_tokenise_alike_after_normalisation():
    assert ja_tokens(normalize_ja("ｶﾒﾗは１２台")) == ja_tokens(normalize_ja("カメラは12台"))


@pytest.mark.parametrize(
    ("text", "japanese"),
    [
        ("答えは12です。", True),
        ("東京", True),  # kanji-only short answers are Japanese
        ("カタカナ", True),
        ("iPhoneを使います", True),  # a Latin word counts once
        ("ジャネットは16個の卵を売ります。 The answer is 18", True),
        ("The answer is 12.", False),
        ("Bonjour, ça va ?", False),
        ("Здравствуйте", False),
        ("18", False),  # no letters at all
        ("", False),
        ("这是一个非常好的问题我们需要仔细考虑", False),  # long kana-free run: Chinese
        ("ＴＨＥ ＡＮＳＷＥＲ", False),  # full-width Latin is still Latin
    ],
)
def test_is_japanese(text, japanese):
    assert is_japanese(text) is japanese


def test_min_ratio_moves_the_threshold():
    mixed = "The answer is 答え"  # 2 Japanese chars among 3 Latin words + 2 = 0.4
    assert japanese_ratio(mixed) == pytest.approx(0.4)
    assert not is_japanese(mixed)
    assert is_japanese(mixed, min_ratio=0.3)


def test_language_gate_defaults_to_script():
    gate = LanguageGate()
    assert gate.method == "script"
    assert gate("答えは12です。") and not gate("The answer is 12.")
    assert LanguageGate(min_ratio=0.3)("The answer is 答え")


def test_fasttext_gate_explains_how_to_get_fasttext(tmp_path):
    model = tmp_path / "lid.176.ftz"
    model.write_bytes(b"not a fastText model")
    if importlib.util.find_spec("fasttext") is None:
        with pytest.raises(VlmergeError, match="pip install fasttext"):
            LanguageGate(str(model))
    else:  # with fasttext installed, a bad file is still one clear error naming it
        with pytest.raises(VlmergeError, match="lid.176.ftz"):
            LanguageGate(str(model))
