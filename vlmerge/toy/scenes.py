"""Synthetic image scenes and bilingual questions about them: the picture half of the toy world.

A scene is a small canvas split into a 2x2 grid; each occupied cell holds one flat-coloured shape with a 1 px
margin, so shapes never touch and each shape is exactly one connected blob of its colour. Questions are built
from language-independent specs (`QuestionSpec`) and then worded in English or Japanese, so the same item id
means the same question in both languages (parallel data for the base, one truth for both answers).

Japanese answers are short ("赤です。", "2つです。", "赤い丸です。"): under ROUGE-L on MeCab tokens a correct
answer scores 1, a near miss (right shape, wrong colour) keeps the shared tokens, and the fixed template part
("です", "。") stays a small share so the content word decides most of the score. The first answer of each
item is the canonical training target; the rest are accepted variants for scoring.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw

from vlmerge.errors import VlmergeError

VQA_PROMPT = "<image>\nQ: {question}\nA:"
"""Prompt of every toy VQA task (both languages); the completion is " " + answer."""

BACKGROUND = (255, 255, 255)
# name -> (rgb, ja noun, ja attributive form used before a noun)
COLOURS: dict[str, tuple[tuple[int, int, int], str, str]] = {
    "red": ((220, 30, 30), "赤", "赤い"),
    "green": ((30, 160, 50), "緑", "緑の"),
    "blue": ((30, 70, 220), "青", "青い"),
    "yellow": ((235, 200, 20), "黄色", "黄色い"),
    "purple": ((140, 50, 180), "紫", "紫の"),
    "orange": ((245, 130, 20), "オレンジ", "オレンジの"),
}
# name -> (plural, ja)
SHAPES: dict[str, tuple[str, str]] = {
    "circle": ("circles", "丸"),
    "square": ("squares", "四角"),
    "triangle": ("triangles", "三角"),
    "cross": ("crosses", "十字"),
}
# position name -> (ja, cells it covers); the four cells come first, in reading order
POSITIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "top left": ("左上", ("top left",)),
    "top right": ("右上", ("top right",)),
    "bottom left": ("左下", ("bottom left",)),
    "bottom right": ("右下", ("bottom right",)),
    "left": ("左", ("top left", "bottom left")),
    "right": ("右", ("top right", "bottom right")),
    "top": ("上", ("top left", "top right")),
    "bottom": ("下", ("bottom left", "bottom right")),
}
CELLS = tuple(POSITIONS)[:4]
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
QUESTION_KINDS = ("colour_of", "shape_of", "what_at", "where_is", "count_all")
"""No "how many red shapes" / "how many circles": in 1-4-shape scenes their answer is "1" most of the time, so a
model that never sees the picture would score on them; every kind here has no answer above ~1/4 of its items."""
LANGS = ("en", "ja")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cell: str
    box: tuple[int, int, int, int]  # inclusive pixel box (x0, y0, x1, y1)


@dataclass(frozen=True)
class Scene:
    id: str
    size: int
    shapes: tuple[Shape, ...]

    def key(self) -> tuple[tuple[str, str, str], ...]:
        """What the scene shows, ignoring jitter: two scenes with one key are the same picture to a reader."""
        return tuple(sorted((s.cell, s.kind, s.colour) for s in self.shapes))

    def at(self, position: str) -> list[Shape]:
        return [s for s in self.shapes if s.cell in POSITIONS[position][1]]


@dataclass(frozen=True)
class QuestionSpec:
    """A question independent of language: `kind` from QUESTION_KINDS, `arg` a shape, colour or position."""

    kind: str
    arg: str = ""

    @property
    def slug(self) -> str:
        return self.kind + ("-" + self.arg.replace(" ", "_") if self.arg else "")


def make_scenes(n: int, seed: int, *, size: int = 32, max_shapes: int = 4) -> list[Scene]:
    """`n` scenes; scene i depends only on (seed, i, size, max_shapes), so prefixes agree across `n`."""
    return [scene_at(seed, i, size=size, max_shapes=max_shapes) for i in range(n)]


def scene_at(seed: int, index: int, *, size: int = 32, max_shapes: int = 4) -> Scene:
    """Scene `index` of the stream `seed` (what `make_scenes(n, seed)[index]` returns)."""
    if size < 16:
        raise VlmergeError(f"toy scene size {size} px is too small: use 16 or more (shapes need 6 px)")
    if not 1 <= max_shapes <= len(CELLS):
        raise VlmergeError(f"toy scene max_shapes={max_shapes}: must be between 1 and {len(CELLS)}")
    rng = random.Random(f"vlmerge-scene:{seed}:{index}")
    cell_px = size // 2
    cells = sorted(rng.sample(range(len(CELLS)), rng.randint(1, max_shapes)))
    shapes = []
    for c in cells:
        side = rng.randint(max(6, cell_px // 2), cell_px - 2)
        x0 = (c % 2) * cell_px + 1 + rng.randint(0, cell_px - 2 - side)
        y0 = (c // 2) * cell_px + 1 + rng.randint(0, cell_px - 2 - side)
        kind, colour = rng.choice(list(SHAPES)), rng.choice(list(COLOURS))
        shapes.append(Shape(kind, colour, CELLS[c], (x0, y0, x0 + side - 1, y0 + side - 1)))
    return Scene(f"s{seed}-{index:05d}", size, tuple(shapes))


def render(scene: Scene) -> Image.Image:
    """RGB image of the scene: crisp shapes without anti-aliasing, so pixels are exact and deterministic."""
    image = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        fill = COLOURS[s.colour][0]
        x0, y0, x1, y1 = s.box
        if s.kind == "circle":
            draw.ellipse(s.box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(s.box, fill=fill)
        elif s.kind == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
        else:  # cross: two bars of a third of the side through the centre
            bar = max(2, (x1 - x0 + 1) // 3)
            lo = x0 + (x1 - x0 + 1 - bar) // 2
            top = y0 + (y1 - y0 + 1 - bar) // 2
            draw.rectangle((lo, y0, lo + bar - 1, y1), fill=fill)
            draw.rectangle((x0, top, x1, top + bar - 1), fill=fill)
    return image


@lru_cache(maxsize=4096)
def question_specs(scene: Scene) -> tuple[QuestionSpec, ...]:
    """Every question with exactly one true answer for this scene, in a fixed order."""
    kinds = [s.kind for s in scene.shapes]
    colours = [s.colour for s in scene.shapes]
    specs = [QuestionSpec("count_all")]
    for k in SHAPES:
        if kinds.count(k) == 1:
            specs += [QuestionSpec("colour_of", k), QuestionSpec("where_is", k)]
    for c in COLOURS:
        if colours.count(c) == 1:
            specs.append(QuestionSpec("shape_of", c))
    specs += [QuestionSpec("what_at", p) for p in POSITIONS if len(scene.at(p)) == 1]
    return tuple(specs)


EN_QUESTIONS = {
    "colour_of": "What colour is the {shape}?",
    "shape_of": "What shape is the {colour} one?",
    "what_at": "What is {position}?",
    "where_is": "Where is the {shape}?",
    "count_all": "How many shapes are there?",
}
JA_QUESTIONS = {
    "colour_of": "{shape}は何色ですか？",
    "shape_of": "{colour}図形は何ですか？",
    "what_at": "{position}には何がありますか？",
    "where_is": "{shape}はどこにありますか？",
    "count_all": "図形はいくつありますか？",
}


def question(spec: QuestionSpec, lang: str) -> str:
    check_lang(lang)
    a = spec.arg
    if lang == "en":
        words = {"shape": a} if a in SHAPES else {"colour": a}
        words["position"] = ("on the " if a in ("left", "right") else "at the ") + a
        return EN_QUESTIONS[spec.kind].format(**words)
    words = {"shape": ja_shape(a)} if a in SHAPES else {"colour": ja_attr(a)} if a in COLOURS else {}
    words["position"] = POSITIONS[a][0] if a in POSITIONS else ""
    return JA_QUESTIONS[spec.kind].format(**words)


def answers(spec: QuestionSpec, scene: Scene, lang: str) -> list[str]:
    """Accepted answers, canonical first; raises if the spec has no single answer in this scene."""
    check_lang(lang)
    if spec not in question_specs(scene):
        raise VlmergeError(f"question {spec.slug!r} has no single answer in scene {scene.id}")
    k, a = spec.kind, spec.arg
    if k == "count_all":
        n = len(scene.shapes)
        if lang == "en":
            return [str(n), NUMBER_WORDS[n], f"{n} {'shapes' if n != 1 else 'shape'}"]
        return [f"{n}つです。", f"{n}つ", f"図形が{n}つあります。"]
    if k == "what_at":
        s = scene.at(a)[0]
        if lang == "en":
            return [f"{s.colour} {s.kind}", en_article(f"{s.colour} {s.kind}")]
        return [f"{ja_attr(s.colour)}{ja_shape(s.kind)}です。", f"{ja_attr(s.colour)}{ja_shape(s.kind)}"]
    s = next(s for s in scene.shapes if a in (s.kind, s.colour))
    if k == "colour_of":
        if lang == "en":
            return [s.colour, f"It is {s.colour}."]
        noun = COLOURS[s.colour][1]
        return list(dict.fromkeys([f"{noun}です。", noun, noun.removesuffix("色") + "色です。"]))
    if k == "shape_of":
        if lang == "en":
            return [s.kind, en_article(s.kind)]
        return [f"{ja_shape(s.kind)}です。", ja_shape(s.kind)]
    # where_is
    if lang == "en":
        return [s.cell, f"at the {s.cell}"]
    return [f"{POSITIONS[s.cell][0]}です。", POSITIONS[s.cell][0]]


def vqa_items(scenes: list[Scene], lang: str, *, per_scene: int | None = 1, seed: int = 0) -> list[dict]:
    """Items `{"id", "question", "answers", "scene"}`; `per_scene=None` asks every question of each scene.

    The questions picked depend on (seed, scene id), never on `lang`: ids and picks match across languages.
    Each pick first draws a question kind uniformly, so rare kinds are not swamped by common ones.
    """
    check_lang(lang)
    return [vqa_item(scene, spec, lang) for scene in scenes for spec in _pick_specs(scene, per_scene, seed)]


def vqa_item(scene: Scene, spec: QuestionSpec, lang: str) -> dict:
    """One item; its id `<scene id>-<spec slug>` is the same in both languages."""
    return {"id": f"{scene.id}-{spec.slug}", "question": question(spec, lang),
            "answers": answers(spec, scene, lang), "scene": scene}


def _pick_specs(scene: Scene, per_scene: int | None, seed: int) -> list[QuestionSpec]:
    specs = question_specs(scene)
    if per_scene is None:
        return list(specs)
    rng = random.Random(f"vlmerge-vqa:{seed}:{scene.id}")
    picked: list[QuestionSpec] = []
    while len(picked) < min(per_scene, len(specs)):
        left = [s for s in specs if s not in picked]
        kind = rng.choice(sorted({s.kind for s in left}, key=QUESTION_KINDS.index))
        picked.append(rng.choice([s for s in left if s.kind == kind]))
    return picked


def en_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def ja_shape(kind: str) -> str:
    return SHAPES[kind][1]


def ja_attr(colour: str) -> str:
    return COLOURS[colour][2]


def check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise VlmergeError(f"toy language {lang!r} is not one of {LANGS}")
