"""The final numeric answer of a math response: the last number in the text, read the way people write it.

Rules (after NFKC, which turns "５６００" into "5600" and "，．" into ",."):
- "," is a thousands separator only between digit groups of three ("5,600", "1,234,567"); otherwise it
  separates numbers ("12,34" -> 34, "12,5" -> 5). The published EvoLLM-JP scorer read "5,600" as 600.
- "." is a decimal point only with a digit after it ("12.5"; "12." and "12。" are 12); ".5" reads as 0.5.
- a leading "-" or "−" is a sign unless it follows a digit, a Latin letter or a closing bracket
  ("-3", "= −3" are negative; "10-3" is 10 and 3).
- a simple fraction "a/b" (b != 0) is its value: "3/4" -> 0.75, since reading it as 4 is surely wrong.
- currency and units around the number do not matter ("$1,000", "1,000円", "50%").
Kanji numerals ("五千") and European decimal commas are not read.
"""

from __future__ import annotations

import math
import re
import unicodedata

from vlmerge.errors import VlmergeError

_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\w.])\.\d+"
_NUMBER = re.compile(rf"(?P<sign>(?<![0-9A-Za-z)\]])-)?(?P<num>{_UNSIGNED})(?:/(?P<den>\d+(?!\.\d)))?")
_MINUS_SIGNS = re.compile("[\u2212\u2796\ufe63\uff0d]")
_GOLD = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")


def _prepare(text: str) -> str:
    return _MINUS_SIGNS.sub("-", unicodedata.normalize("NFKC", text))


def _value(match: re.Match) -> float:
    value = float(match["num"].replace(",", ""))
    if match["den"] is not None and int(match["den"]) != 0:
        value /= int(match["den"])
    elif match["den"] is not None:
        value = 0.0  # "a/0": take the last number written, the 0
    return -value if match["sign"] else value


def extract_numbers(text: str) -> list[float]:
    """Every number in the text, in order, under the rules of the module docstring."""
    return [_value(m) for m in _NUMBER.finditer(_prepare(text))]


def extract_answer(text: str) -> float | None:
    """The last number in a response, or None when it has none."""
    numbers = extract_numbers(text)
    return numbers[-1] if numbers else None


def parse_gold(value: str | int | float) -> float:
    """A gold answer as a number ("5,600" -> 5600.0); refuses anything that is not exactly one number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = _prepare(str(value)).strip()
    if not _GOLD.fullmatch(text):
        raise VlmergeError(f"gold answer {value!r} is not a number (expected e.g. 18, 5,600 or 12.5)")
    return float(text.replace(",", ""))


def numbers_equal(a: float | None, b: float | None, *, rel_tol: float = 1e-6, abs_tol: float = 1e-6) -> bool:
    """Equality up to float noise ("0.1 + 0.2" style); None (no answer) equals nothing."""
    if a is None or b is None:
        return False
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)
