"""What each toy VLM sees: per question kind, how many answers are right in any language, against a blind guess.

    python -m vlmerge.toy.vqa_probe                                  # the committed VLM and its tower swap
    python -m vlmerge.toy.vqa_probe --merged outputs/RUN/best ...    # and merged models (e.g. a search's best/)

ROUGE-L rewards the answer's form as well as its content ("1つ" for "4つ" keeps half the score), so a model
that answers in Japanese without looking at the picture already scores. This probe separates the two on the
items of a toy_vqa_ja split (default: the committed held-out split; pick another with `--data`/`--split`):
for the VLM with the English and with the Japanese wording of each question, the tower swap (the Japanese LM's
tower behind the VLM's vision encoder and projector) and each `--merged` folder, it prints the share of answers
that are right (an English answer is read through the toy lexicon: "red circle" is right for "赤い丸"), per
question kind and in all, and the share of answers in Japanese. The `blind` row is the best a model that never
sees the picture can do: the share of each kind's most common answer (shapes, colours and cells are drawn
independently, so the question does not help). A second table counts the answers that begin right: whose
first token (a kana, kanji or digit) is the reference's, so "赤い丸" begins right for "赤です。" and "右上" does
not for "左上です。" -- the first decision a merged tower makes from the picture, before the answer's form.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmerge.errors import VlmergeError, exit_on_user_error
from vlmerge.eval.data import Item, load_vqa_jsonl
from vlmerge.eval.generate import GenerationSettings, cut_at_stop, generate
from vlmerge.eval.loading import ModelBundle, load_model
from vlmerge.eval.rouge import exact_item
from vlmerge.eval.text import is_japanese
from vlmerge.models.towers import detect_family
from vlmerge.toy import scenes as S
from vlmerge.toy.tokenizer import PIECE_PATTERN

DEFAULT_DATA = Path("eval_data/toy_vqa_ja")
NUMBER_WORDS = {word: str(i) for i, word in enumerate(S.NUMBER_WORDS)}


@dataclass(frozen=True)
class VqaItem:
    kind: str
    question_en: str
    item: Item  # the Japanese question, its accepted answers (canonical first) and the image


@dataclass(frozen=True)
class ProbeRow:
    name: str
    right: dict[str, float]  # kind -> share right (0..1), plus "all"
    begins: dict[str, float]  # kind -> share whose first token is the reference's
    japanese: float | None
    example: str


def read_items(data: Path, split: str, limit: int | None = None) -> list[VqaItem]:
    """The items of a toy_vqa_ja split with the English wording of each question, rebuilt from its id."""
    items = []
    for item in load_vqa_jsonl(str(data), limit=limit).split(split):
        match = re.fullmatch(r"s\d+-\d+-([a-z_]+?)(?:-([a-z_]+))?", item.id)
        if not match or match.group(1) not in S.QUESTION_KINDS:
            raise VlmergeError(f"toy VQA probe: {data}/{split}: id {item.id!r} is not a toy VQA item id")
        spec = S.QuestionSpec(match.group(1), (match.group(2) or "").replace("_", " "))
        items.append(VqaItem(spec.kind, S.question(spec, "en"), item))
    return items


def as_japanese(answer: str) -> str:
    """An English toy answer in the Japanese lexicon ("a red circle" -> "赤い丸", "2 shapes" -> "2つ"); other
    text unchanged."""
    words = [w for w in re.sub(r"[.!?]", "", answer.lower()).split() if w not in ("a", "an", "the", "at", "on")]
    words = words[2:] if words[:2] == ["it", "is"] else words
    text = " ".join(words)
    if words and (words[0].isdigit() or words[0] in NUMBER_WORDS) and words[1:] in ([], ["shape"], ["shapes"]):
        return NUMBER_WORDS.get(words[0], words[0]) + "つ"
    if len(words) == 2 and words[0] in S.COLOURS and words[1] in S.SHAPES:
        return S.ja_attr(words[0]) + S.ja_shape(words[1])
    if text in S.COLOURS:
        return S.COLOURS[text][1]
    if text in S.SHAPES:
        return S.ja_shape(text)
    if text in S.POSITIONS:
        return S.POSITIONS[text][0]
    return answer


def is_right(reply: str, item: VqaItem) -> bool:
    """An exact match (as the `exact` score counts it), the reply read as Japanese if it is an English answer."""
    return bool(exact_item(reply, item.item.answers) or exact_item(as_japanese(reply), item.item.answers))


def first_token(text: str) -> str:
    """The first toy-tokenizer piece of `text` (an English word, or one character)."""
    pieces = re.findall(PIECE_PATTERN, text.strip())
    return pieces[0] if pieces else ""


def begins_right(reply: str, item: VqaItem) -> bool:
    """The reply (read as Japanese if it is an English answer) begins with the reference's first token."""
    first = first_token(item.item.answers[0])
    return any(first_token(text) == first for text in (reply, as_japanese(reply)))


def probe_bundle(name: str, bundle: ModelBundle, items: list[VqaItem], lang: str) -> ProbeRow:
    questions = [it.question_en if lang == "en" else it.item.question for it in items]
    prompts = [S.VQA_PROMPT.format(question=q) for q in questions]
    images = [it.item.image for it in items]
    settings = GenerationSettings(max_new_tokens=24, stop=("\n",), batch_size=64)
    replies = [cut_at_stop(text, settings.stop).strip() for text in generate(bundle, prompts, images, settings)]
    pairs = list(zip(replies, items))
    japanese = sum(is_japanese(r) for r in replies) / len(items)
    return ProbeRow(name, by_kind(items, [is_right(r, it) for r, it in pairs]),
                    by_kind(items, [begins_right(r, it) for r, it in pairs]), japanese, replies[0])


def blind_row(items: list[VqaItem]) -> ProbeRow:
    """Each item counted right when its answer is the most common one of its kind (and begins right when
    its first token is the most common first token of its kind)."""
    def most_common(key) -> dict[str, str]:
        return {kind: Counter(key(it) for it in items if it.kind == kind).most_common(1)[0][0]
                for kind in {it.kind for it in items}}

    answer = most_common(lambda it: it.item.answers[0])
    first = most_common(lambda it: first_token(it.item.answers[0]))
    return ProbeRow("blind", by_kind(items, [it.item.answers[0] == answer[it.kind] for it in items]),
                    by_kind(items, [first_token(it.item.answers[0]) == first[it.kind] for it in items]), None, "")


def by_kind(items: list[VqaItem], right: list[bool]) -> dict[str, float]:
    out = {}
    for kind in S.QUESTION_KINDS:
        marks = [r for it, r in zip(items, right) if it.kind == kind]
        if marks:
            out[kind] = sum(marks) / len(marks)
    out["all"] = sum(right) / len(right)
    return out


def check_models(models: Path, merged: list[Path]) -> None:
    """Refuse, before any model loads, a --models folder without the toy build's vlm_en/ and lm_ja/ and a
    --merged entry that is not a VLM folder (a text-only LM cannot be asked about a picture)."""
    for name, family in (("vlm_en", "a VLM"), ("lm_ja", "an LM")):
        folder = Path(models) / name
        if not folder.is_dir():
            raise VlmergeError(f"toy VQA probe: --models {models}: {folder} is not a folder (--models names the "
                               f"toy build's output, with vlm_en/ and lm_ja/)")
        try:
            detect_family(folder)
        except VlmergeError as err:
            raise VlmergeError(f"toy VQA probe: --models {models}: {name}/ is not {family} folder: {err}") from None
    for folder in merged:
        if not Path(folder).is_dir():
            raise VlmergeError(f"toy VQA probe: --merged {folder}: not a folder")
        try:
            family = detect_family(Path(folder)).family
        except VlmergeError as err:
            raise VlmergeError(f"toy VQA probe: --merged {folder}: not a model folder: {err}") from None
        if family == "causal_lm":
            raise VlmergeError(f"toy VQA probe: --merged {folder}: a text-only LM, not a VLM (the probe asks "
                               f"about pictures)")


def probe(models: Path, merged: list[Path], data: Path, split: str, n: int | None) -> list[ProbeRow]:
    """Every argument is checked (the items read, every model folder looked at) before the first model loads."""
    if n is not None and n < 1:
        raise VlmergeError(f"toy VQA probe: --n {n}: probe at least one item")
    check_models(models, merged)
    items = read_items(data, split, n)
    vlm = load_model({"path": str(models / "vlm_en"), "device": "cpu"})
    rows = [blind_row(items), probe_bundle("vlm_en (English questions)", vlm, items, "en"),
            probe_bundle("vlm_en", vlm, items, "ja")]
    vlm.model.language_model.load_state_dict(load_model({"path": str(models / "lm_ja")}).model.state_dict())
    rows.append(probe_bundle("tower swap (lm_ja)", vlm, items, "ja"))
    for folder in merged:
        rows.append(probe_bundle(str(folder), load_model({"path": str(folder), "device": "cpu"}), items, "ja"))
    return rows


def table(rows: list[ProbeRow], field: str = "right") -> str:
    """`field` "right": % right per kind, % Japanese and the first reply; "begins": % that begin right."""
    kinds = [k for k in (*S.QUESTION_KINDS, "all") if k in rows[0].right]
    head = f"{'model':<30} " + " ".join(f"{k:>9}" for k in kinds)
    lines = [head + (f" {'japanese':>8}  first reply" if field == "right" else "")]
    for r in rows:
        ja = "" if r.japanese is None else f"{100 * r.japanese:.1f}"
        line = f"{r.name[-30:]:<30} " + " ".join(f"{100 * getattr(r, field)[k]:9.1f}" for k in kinds)
        lines.append(line + (f" {ja:>8}  {r.example[:24]}" if field == "right" else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlmerge.toy.vqa_probe", description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("eval_data/toy_models"),
                        help="folder with vlm_en/ and lm_ja/ (the toy build's output)")
    parser.add_argument("--merged", type=Path, nargs="*", default=[], help="merged VLM folders to probe too")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a toy_vqa_ja eval-set folder")
    parser.add_argument("--split", default="heldout", help="search or heldout")
    parser.add_argument("--n", type=int, default=None, help="probe only the first N items")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.threads < 1:
        raise VlmergeError(f"toy VQA probe: --threads {args.threads}: must be at least 1")
    if not args.data.exists():
        raise VlmergeError(f"toy VQA probe: --data {args.data}: not found (give a toy_vqa_ja eval-set folder)")
    torch.set_num_threads(args.threads)
    rows = probe(args.models, args.merged, args.data, args.split, args.n)
    print("% right (in either language)\n" + table(rows, "right"))
    print("\n% beginning with the reference's first token\n" + table(rows, "begins"))


if __name__ == "__main__":
    exit_on_user_error(main)
