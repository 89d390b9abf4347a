"""What each toy text LM can do on word problems, in each language: the check to run before any merge.

    python -m vlmerge.toy.probe                              # the committed models, 128 problems per language
    python -m vlmerge.toy.probe --models DIR --n 64 --folders base lm_math_en --seed 90003   # world development

For every model folder and language it greedily answers `n` word problems from a seed the training data never use
(by default the eval sets' held-out stream; `--seed` picks another) and prints: `acc` (last number right, any
language), `set_up` (the reply starts with the problem's sum, "7 + 1"), `japanese` (the reply counts as Japanese
for acc_ja), `from_sum` (the reply forced to begin with the right sum, "7 + 1 =": the next number is its value). A
merge can only transfer what a source has: an English math LM with a high English `acc` but a Japanese `set_up`
near 0 has not learned to read Japanese problems, whatever the merge; and a low Japanese `from_sum` says it cannot
even finish a sum that another model set up for it after a Japanese problem (its arithmetic is tied to English
problem text, not to the written sum), so a merge has no shared step to join the two at. The last two columns
say which of the two a model computes from: forced to begin with *another* sum of the same operation ("3 + 4 ="),
`follows_sum` is the share whose next number is that sum's value, `from_text` the share whose next number is the
problem's own answer, read from the text past the written sum (the committed English math LM on 128 English
problems of `--seed 90003`: 52% and 9%, against a `from_sum` of 100%; on Japanese ones it solves 53% and finishes
66% of written sums, answering in English: what a merge can carry into Japanese answers).
"""

from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vlmerge.errors import VlmergeError, exit_on_user_error
from vlmerge.eval.generate import GenerationSettings, cut_at_stop, generate
from vlmerge.eval.loading import ModelBundle, load_model
from vlmerge.eval.math_answer import extract_answer, numbers_equal
from vlmerge.eval.text import is_japanese
from vlmerge.toy import problems as P
from vlmerge.toy.splits import EVAL_SEED_BASE

PROBE_SEED = EVAL_SEED_BASE + 1  # the held-out stream of the default eval sets
TEXT_FOLDERS = ("base", "lm_ja", "lm_math_en")


@dataclass(frozen=True)
class ProbeResult:
    folder: str
    lang: str
    acc: float
    set_up: float
    japanese: float
    from_sum: float
    follows_sum: float
    from_text: float
    example: str


def probe_model(bundle: ModelBundle, problems: list[P.Problem], lang: str, *,
                max_new_tokens: int = 40) -> tuple[dict[str, float], list[str]]:
    """Greedy first-line replies of a loaded text LM to `problems` asked in `lang`, and the six rates (0..1)."""
    prompts = [P.MATH_PROMPT.format(question=P.question(p, lang)) for p in problems]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, stop=("\n",), batch_size=64)
    replies = [cut_at_stop(text, settings.stop).strip() for text in generate(bundle, prompts, settings=settings)]
    decoys = [decoy(p) for p in problems]
    values = _next_numbers(bundle, [f"{prompt} {_written(p)} =" for prompt, p in zip(prompts, problems)])
    decoy_values = _next_numbers(bundle, [f"{prompt} {_written(d)} =" for prompt, d in zip(prompts, decoys)])
    n = len(problems)
    rates = {
        "acc": sum(numbers_equal(extract_answer(r), p.answer) for p, r in zip(problems, replies)) / n,
        "set_up": sum(r.startswith(_written(p)) for p, r in zip(problems, replies)) / n,
        "japanese": sum(is_japanese(r) for r in replies) / n,
        "from_sum": sum(v == p.answer for p, v in zip(problems, values)) / n,
        "follows_sum": sum(v == d.answer for d, v in zip(decoys, decoy_values)) / n,
        "from_text": sum(v == p.answer for p, v in zip(problems, decoy_values)) / n,
    }
    return rates, replies


def decoy(problem: P.Problem) -> P.Problem:
    """Another sum of the same operation with another value, operands drawn as the problems' are (seeded by the
    problem id): written after the problem, it tells computing from the written sum from reading the text."""
    rng = random.Random(f"vlmerge-probe-decoy:{problem.id}")
    config = P.ProblemConfig()
    lo, hi = config.factor_range if problem.op == "×" else config.operand_range
    while True:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if problem.op == "-":
            a, b = a + b, a
        other = replace(problem, a=a, b=b)
        if other.answer != problem.answer:
            return other


def _written(problem: P.Problem) -> str:
    return f"{problem.a} {problem.op} {problem.b}"


def _next_numbers(bundle: ModelBundle, prompts: list[str]) -> list[int | None]:
    texts = generate(bundle, prompts, settings=GenerationSettings(max_new_tokens=4, stop=("\n",), batch_size=64))
    return [int(m.group(1)) if (m := re.match(r"\s*(\d+)", text)) else None for text in texts]


def probe_folders(models: Path, folders: list[str], n: int, seed: int = PROBE_SEED) -> list[ProbeResult]:
    missing = [f for f in folders if not (models / f / "config.json").is_file()]
    if missing:
        raise VlmergeError(f"toy probe: no model in {', '.join(str(models / f) for f in missing)} "
                           f"(build them with python -m vlmerge.toy.build --out {models})")
    if n < 1:
        raise VlmergeError(f"toy probe: --n {n}: ask at least one problem")
    problems = P.make_problems(n, seed)
    out = []
    for folder in folders:
        bundle = load_model({"path": str(models / folder), "device": "cpu"})
        for lang in ("en", "ja"):
            rates, replies = probe_model(bundle, problems, lang)
            out.append(ProbeResult(folder, lang, **rates, example=replies[0]))
    return out


def table(results: list[ProbeResult]) -> str:
    lines = [f"{'model':<12} {'lang':<4} {'acc':>5} {'set_up':>6} {'japanese':>8} {'from_sum':>8} "
             f"{'follows_sum':>11} {'from_text':>9}  first reply"]
    for r in results:
        lines.append(f"{r.folder:<12} {r.lang:<4} {100 * r.acc:5.1f} {100 * r.set_up:6.1f} "
                     f"{100 * r.japanese:8.1f} {100 * r.from_sum:8.1f} {100 * r.follows_sum:11.1f} "
                     f"{100 * r.from_text:9.1f}  {r.example[:48]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlmerge.toy.probe", description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("eval_data/toy_models"))
    parser.add_argument("--folders", nargs="+", default=list(TEXT_FOLDERS))
    parser.add_argument("--n", type=int, default=128, help="problems per language")
    parser.add_argument("--seed", type=int, default=PROBE_SEED,
                        help=f"problem stream (default {PROBE_SEED}: the committed held-out split's); to compare "
                             "world variants use a validation stream, e.g. 90003 (`toy.splits --seed 1` held-out)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.threads < 1:
        raise VlmergeError(f"toy probe: --threads {args.threads}: use at least one thread")
    torch.set_num_threads(args.threads)
    print(table(probe_folders(args.models, args.folders, args.n, args.seed)))


if __name__ == "__main__":
    exit_on_user_error(main)
