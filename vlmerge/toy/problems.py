"""Arithmetic word problems in English and Japanese: the math half of the toy world.

One `Problem` is language-independent (operation, operands, people, item, template); `question` and
`worked_answer` word it in either language, so a problem id names the same sum in both. The English math
LLM is trained on English worked answers ("3 + 4 = 7. The answer is 7."); the Japanese eval asks the same
problems in Japanese and scores the last number of the reply. `reading_question` asks for a number already in
the text: the Japanese LLM learns to read Japanese problems and answer "答えは3です。" without ever seeing an
operation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from vlmerge.errors import VlmergeError

MATH_PROMPT = "Q: {question}\nA:"
"""Prompt of the toy math tasks (both languages); the completion is " " + worked answer."""

OPS = ("+", "-", "×")
# name -> (ja, English pronoun subject, English pronoun object)
NAMES: dict[str, tuple[str, str, str]] = {
    "Ken": ("ケン", "he", "him"),
    "Taro": ("タロウ", "he", "him"),
    "Yumi": ("ユミ", "she", "her"),
    "Hana": ("ハナ", "she", "her"),
}
# singular -> (plural, ja noun, ja counter)
ITEMS: dict[str, tuple[str, str, str]] = {
    "apple": ("apples", "りんご", "個"),
    "candy": ("candies", "あめ", "個"),
    "pencil": ("pencils", "えんぴつ", "本"),
    "book": ("books", "本", "冊"),
    "card": ("cards", "カード", "枚"),
}
# op -> [(English, Japanese)]; a_items / b_items: the count with its noun; nm, ot, it, c: Japanese name,
# other name, item, counter
TEMPLATES: dict[str, list[tuple[str, str]]] = {
    "+": [
        ("{name} has {a_items} and buys {b} more. How many {items} does {he} have now?",
         "{nm}は{it}を{a}{c}持っていて、{b}{c}買いました。{it}は全部で何{c}ですか？"),
        ("{name} has {a_items}. {other} gives {him} {b} more. How many {items} does {name} have now?",
         "{nm}は{it}を{a}{c}持っています。{ot}が{it}を{b}{c}くれました。{nm}の{it}は全部で何{c}ですか？"),
    ],
    "-": [
        ("{name} has {a_items} and gives {b} to {other}. How many {items} are left?",
         "{nm}は{it}を{a}{c}持っていて、{ot}に{b}{c}あげました。{it}は何{c}残っていますか？"),
        ("{name} had {a_items} and lost {b}. How many {items} are left?",
         "{nm}は{it}を{a}{c}持っていましたが、{b}{c}なくしました。{it}は何{c}残っていますか？"),
    ],
    "×": [
        ("{name} buys {a} boxes with {b_items} in each box. How many {items} does {he} buy?",
         "{nm}は{it}が{b}{c}ずつ入った箱を{a}つ買いました。{it}は全部で何{c}ですか？"),
    ],
}
STATEMENTS = {"en": "{name} has {a_items}.", "ja": "{nm}は{it}を{a}{c}持っています。"}
READING_QUESTIONS = {"en": "How many {items} does {name} have?", "ja": "{nm}は{it}を何{c}持っていますか？"}
WORKED = {"en": "{a} {op} {b} = {n}. The answer is {n}.", "ja": "{a} {op} {b} = {n}。答えは{n}です。"}
ANSWER_ONLY = {"en": "The answer is {n}.", "ja": "答えは{n}です。"}


@dataclass(frozen=True)
class ProblemConfig:
    """Difficulty knobs: operands of + and - are drawn from `operand_range` (a - b is posed as (b + c) - b,
    so its answer is in range too); × draws both factors from `factor_range`."""

    operand_range: tuple[int, int] = (1, 9)
    ops: tuple[str, ...] = ("+", "-")
    factor_range: tuple[int, int] = (2, 5)

    def __post_init__(self):
        bad = [op for op in self.ops if op not in OPS]
        if bad or not self.ops:
            raise VlmergeError(f"toy math ops {self.ops!r}: use a non-empty subset of {OPS}")
        for name in ("operand_range", "factor_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise VlmergeError(f"toy math {name}={(lo, hi)}: need 0 <= low <= high")


@dataclass(frozen=True)
class Problem:
    id: str
    op: str
    a: int
    b: int
    name: str
    other: str
    item: str
    template: int

    @property
    def answer(self) -> int:
        return {"+": self.a + self.b, "-": self.a - self.b, "×": self.a * self.b}[self.op]


def make_problems(n: int, seed: int, config: ProblemConfig = ProblemConfig()) -> list[Problem]:
    """`n` problems; problem i depends only on (seed, i, config), so prefixes agree across `n`."""
    return [_make_problem(f"m{seed}-{i:05d}", random.Random(f"vlmerge-problem:{seed}:{i}"), config)
            for i in range(n)]


def _make_problem(problem_id: str, rng: random.Random, config: ProblemConfig) -> Problem:
    op = rng.choice(config.ops)
    lo, hi = config.factor_range if op == "×" else config.operand_range
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if op == "-":
        a, b = a + b, a
    name, other = rng.sample(list(NAMES), 2)
    item = rng.choice(list(ITEMS))
    return Problem(problem_id, op, a, b, name, other, item, rng.randrange(len(TEMPLATES[op])))


def question(problem: Problem, lang: str) -> str:
    return _fill(TEMPLATES[problem.op][problem.template][_lang_index(lang)], problem)


def worked_answer(problem: Problem, lang: str) -> str:
    """The training target: the equation, then the answer sentence (the last number is the answer)."""
    _lang_index(lang)
    return WORKED[lang].format(a=problem.a, op=problem.op, b=problem.b, n=problem.answer)


def statement(problem: Problem, lang: str) -> str:
    """What the first person holds, without a question: answer-free parallel text for the base corpus."""
    _lang_index(lang)
    return _fill(STATEMENTS[lang], problem)


def reading_question(problem: Problem, lang: str) -> tuple[str, str]:
    """(question, answer) whose answer is the number stated in the text: reading, not arithmetic."""
    _lang_index(lang)
    text = _fill(STATEMENTS[lang] + " " * (lang == "en") + READING_QUESTIONS[lang], problem)
    return text, ANSWER_ONLY[lang].format(n=problem.a)


def answer_text(problem: Problem) -> str:
    """The eval answer: the number as text."""
    return str(problem.answer)


def _fill(template: str, p: Problem) -> str:
    plural, ja_item, counter = ITEMS[p.item]
    nm_ja, he, him = NAMES[p.name]

    def count(n: int) -> str:
        return f"{n} {p.item if n == 1 else plural}"

    return template.format(
        name=p.name, other=p.other, he=he, him=him, a=p.a, b=p.b, items=plural,
        a_items=count(p.a), b_items=count(p.b), nm=nm_ja, ot=NAMES[p.other][0], it=ja_item, c=counter,
    )


def _lang_index(lang: str) -> int:
    if lang not in ("en", "ja"):
        raise VlmergeError(f"toy language {lang!r} is not one of ('en', 'ja')")
    return ("en", "ja").index(lang)
