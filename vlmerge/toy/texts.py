"""Training text of the toy world: what each shipped source model learns, and why the merges can work.

Design intent (the EvoVLM-JP / EvoLLM-JP setting in miniature, from one bilingual base):

* `base_corpus` (pre-training of the base LM): scene descriptions in English and Japanese, the same scene
  described in both languages side by side, phrase and sentence translations, and word problems in both
  languages *without answers*. It teaches both languages and ties "red" to "赤", "buys" to "買いました", so
  the fine-tunes below share one coordinate system; it teaches no question answering and no arithmetic.
  (The base's question answering, in English after "A:" and in Japanese after the cue "答え:", and its small
  worked problems are `build.reader_examples`; its bare sums after documents, `build.with_sums`.)
* `english_vqa_sft` (the VLM): "<image>\\nQ: <English question>\\nA: red" -- seeing, in English only.
* `japanese_llm_sft` (the Japanese LLM, no images): questions about a scene *described in text*, asked and
  answered in Japanese with the same prompt shape as VQA (the description takes the place of `<image>`), also
  from an English description (facts in English, reply in Japanese: the bridge the VLM's English-trained
  picture features need), reading problems ("ケンはりんごを3個持っています。…何個…？" -> "答えは3です。")
  that teach the Japanese problem format without an operation, and English -> Japanese translation. (The
  committed Japanese LM drops the reading problems and solves small problems in Japanese instead:
  `build.japanese_examples`.)
* `english_math_sft` (the math LLM): English word problems with worked answers -- arithmetic, in English only.

So the VLM alone answers in English (0 under Japanese ROUGE), the Japanese LLM alone answers in Japanese but
blind to the picture, the math LLM alone computes but answers in English; only a merge has both halves.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from vlmerge.errors import VlmergeError
from vlmerge.toy import problems as P
from vlmerge.toy import scenes as S

TEXT_QA_PROMPT = "{context}\nQ: {question}\nA:"
TRANSLATE_PROMPTS = {"en-ja": "English: {text}\nJapanese:", "ja-en": "Japanese: {text}\nEnglish:"}
PROMPTS = {"vqa": S.VQA_PROMPT, "math": P.MATH_PROMPT, "text_qa": TEXT_QA_PROMPT, **TRANSLATE_PROMPTS}
"""Every toy prompt template; completions are " " + target, so prompt + completion is the training text."""

JA_SFT_MIX = {"text_qa": 0.4, "text_qa_cross": 0.2, "reading": 0.2, "translate": 0.2}
BASE_MIX = {"describe_en": 0.2, "describe_ja": 0.2, "describe_parallel": 0.2, "translate": 0.2,
            "problem_parallel": 0.2}


@dataclass(frozen=True)
class Example:
    """One supervised example; `scene` is set for VQA (render it for the image) and None for text."""

    task: str
    lang: str
    prompt: str
    completion: str
    scene: S.Scene | None = None

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def describe(scene: S.Scene, lang: str) -> str:
    """The scene in words, cell by cell in reading order."""
    if lang == "en":
        return " ".join(f"There is {S.en_article(s.colour + ' ' + s.kind)} at the {s.cell}."
                        for s in scene.shapes)
    S.check_lang(lang)
    return "".join(f"{S.POSITIONS[s.cell][0]}に{S.ja_attr(s.colour)}{S.ja_shape(s.kind)}があります。"
                   for s in scene.shapes)


def vqa_examples(scenes: list[S.Scene], lang: str, *, per_scene: int | None = 1,
                 seed: int = 0) -> list[Example]:
    items = S.vqa_items(scenes, lang, per_scene=per_scene, seed=seed)
    return [Example("vqa", lang, S.VQA_PROMPT.format(question=it["question"]), " " + it["answers"][0],
                    it["scene"]) for it in items]


def text_qa_examples(scenes: list[S.Scene], lang: str, *, context_lang: str | None = None,
                     per_scene: int | None = 1, seed: int = 0) -> list[Example]:
    """VQA with the picture replaced by its description (in `context_lang`, default `lang`)."""
    ctx = context_lang or lang
    task = "text_qa" if ctx == lang else "text_qa_cross"
    items = S.vqa_items(scenes, lang, per_scene=per_scene, seed=seed)
    return [Example(task, lang, TEXT_QA_PROMPT.format(context=describe(it["scene"], ctx),
                                                      question=it["question"]), " " + it["answers"][0])
            for it in items]


def math_examples(problems: list[P.Problem], lang: str) -> list[Example]:
    return [Example("math", lang, P.MATH_PROMPT.format(question=P.question(p, lang)),
                    " " + P.worked_answer(p, lang)) for p in problems]


def reading_examples(problems: list[P.Problem], lang: str) -> list[Example]:
    out = []
    for p in problems:
        q, a = P.reading_question(p, lang)
        out.append(Example("reading", lang, P.MATH_PROMPT.format(question=q), " " + a))
    return out


def parallel_pairs(scene: S.Scene, problem: P.Problem, rng: random.Random) -> list[tuple[str, str]]:
    """(English, Japanese) pairs about one scene and one problem: words, phrases, sentences, Q and A."""
    shape = rng.choice(scene.shapes)
    spec = rng.choice(S.question_specs(scene))
    n = len(scene.shapes)
    return [
        (shape.colour, S.COLOURS[shape.colour][1]),
        (shape.kind, S.ja_shape(shape.kind)),
        (f"{shape.colour} {shape.kind}", S.ja_attr(shape.colour) + S.ja_shape(shape.kind)),
        (shape.cell, S.POSITIONS[shape.cell][0]),
        (f"{n} {'shape' if n == 1 else 'shapes'}", f"図形が{n}つ"),
        (describe(scene, "en"), describe(scene, "ja")),
        (S.question(spec, "en"), S.question(spec, "ja")),
        (P.question(problem, "en"), P.question(problem, "ja")),
        (problem.name, P.NAMES[problem.name][0]),
        (problem.item, P.ITEMS[problem.item][1]),
    ]


def translation_example(scene: S.Scene, problem: P.Problem, rng: random.Random, direction: str) -> Example:
    en, ja = rng.choice(parallel_pairs(scene, problem, rng))
    src, tgt = (en, ja) if direction == "en-ja" else (ja, en)
    return Example("translate", direction, TRANSLATE_PROMPTS[direction].format(text=src), " " + tgt)


def english_vqa_sft(n: int, seed: int, *, size: int = 32, per_scene: int = 1) -> list[Example]:
    """VLM fine-tuning data: English questions about `n` rendered scenes (English only)."""
    return vqa_examples(S.make_scenes(n, seed, size=size), "en", per_scene=per_scene, seed=seed)


def english_math_sft(n: int, seed: int, config: P.ProblemConfig | None = None) -> list[Example]:
    """Math LLM fine-tuning data: English word problems with worked answers (English only)."""
    return math_examples(P.make_problems(n, seed, config or P.ProblemConfig()), "en")


def japanese_llm_sft(n: int, seed: int, mix: dict[str, float] | None = None) -> list[Example]:
    """Japanese LLM fine-tuning data (text only), `n` examples drawn from `mix` (default JA_SFT_MIX)."""
    scenes, problems = S.make_scenes(n, seed), P.make_problems(n, seed)
    out = []
    for i, task in enumerate(_draw_tasks(n, seed, mix or JA_SFT_MIX, "ja-sft", JA_SFT_MIX)):
        rng = random.Random(f"vlmerge-ja-sft-item:{seed}:{i}")
        if task in ("text_qa", "text_qa_cross"):
            ctx = "ja" if task == "text_qa" else "en"
            out += text_qa_examples([scenes[i]], "ja", context_lang=ctx, seed=seed)
        elif task == "reading":
            out += reading_examples([problems[i]], "ja")
        else:
            out.append(translation_example(scenes[i], problems[i], rng, "en-ja"))
    return out


def base_corpus(n: int, seed: int, mix: dict[str, float] | None = None) -> list[str]:
    """`n` bilingual pre-training documents drawn from `mix` (default BASE_MIX); no QA, no arithmetic."""
    scenes, problems = S.make_scenes(n, seed), P.make_problems(n, seed)
    docs = []
    for i, task in enumerate(_draw_tasks(n, seed, mix or BASE_MIX, "base", BASE_MIX)):
        rng = random.Random(f"vlmerge-base-item:{seed}:{i}")
        scene, problem = scenes[i], problems[i]
        pair = [describe(scene, "en"), describe(scene, "ja")]
        if task == "describe_en":
            docs.append(pair[0])
        elif task == "describe_ja":
            docs.append(pair[1])
        elif task == "describe_parallel":
            docs.append("\n".join(pair[:: rng.choice((1, -1))]))
        elif task == "translate":
            docs.append(translation_example(scene, problem, rng, rng.choice(list(TRANSLATE_PROMPTS))).text)
        else:
            pair = [P.question(problem, "en"), P.question(problem, "ja")]
            docs.append("\n".join(pair[:: rng.choice((1, -1))]))
    return docs


def tokenizer_corpus(seed: int = 0, n: int = 600) -> list[str]:
    """Text that uses every word and character the toy world can produce (all templates, all lexicon)."""
    scenes = S.make_scenes(n, seed)
    every_op = P.ProblemConfig(ops=P.OPS, operand_range=(0, 9))
    problems = P.make_problems(n, seed, every_op)
    texts = [*base_corpus(n, seed), *(e.text for e in japanese_llm_sft(n, seed))]
    for lang in S.LANGS:
        for it in S.vqa_items(scenes, lang, per_scene=None):
            texts += [S.VQA_PROMPT.format(question=it["question"]), *it["answers"]]
        texts += [e.text for e in math_examples(problems, lang) + reading_examples(problems, lang)]
        other = "en" if lang == "ja" else "ja"
        texts += [e.text for e in text_qa_examples(scenes[:50], lang, context_lang=other)]
    for direction in TRANSLATE_PROMPTS:
        texts += [translation_example(s, p, random.Random(i), direction).text
                  for i, (s, p) in enumerate(zip(scenes, problems))]
    texts += [" ".join(S.NUMBER_WORDS), " ".join(P.OPS), "0123456789"]
    return texts


def _draw_tasks(n: int, seed: int, mix: dict[str, float], stream: str, known: dict) -> list[str]:
    unknown = sorted(set(mix) - set(known))
    if unknown or not any(w > 0 for w in mix.values()):
        raise VlmergeError(f"toy {stream} mix {mix!r}: tasks {unknown} unknown or no positive weight; "
                           f"use tasks from {sorted(known)}")
    rng = random.Random(f"vlmerge-mix:{stream}:{seed}")
    names = sorted(mix)
    return rng.choices(names, weights=[mix[k] for k in names], k=n)
