"""The toy world's data: deterministic, answers true to the pixels, tokenizer lossless, eval sets disjoint."""

from __future__ import annotations

import hashlib
import io
import json
import operator
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlmerge.errors import VlmergeError
from vlmerge.toy import problems as P
from vlmerge.toy import scenes as S
from vlmerge.toy import texts as T
from vlmerge.toy.splits import EvalSetConfig, main, verify_manifest, write_eval_sets
from vlmerge.toy.tokenizer import IMAGE, build_tokenizer, save_tokenizer, vocabulary

REPO = Path(__file__).resolve().parents[2]
JAPANESE = re.compile("[\u3040-\u30ff\u4e00-\u9fff]")
# The shipped toy models are trained on these ids: change the vocabulary only together with them.
OPERATIONS = {"+": operator.add, "-": operator.sub, "×": operator.mul}
VOCAB_SHA256 = "a6a168541ebcbf4c4edd6c8c5fd4ad7413eb91fd1b1a2e555a1d0262fe05ab41"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _kind_from_pixels(image: Image.Image, box: tuple[int, int, int, int]) -> str:
    """Read a shape back from its box: square fills the corners, triangle only the bottom ones, a circle
    fills the point a fifth in from the corner, a cross (bars through the middle third) does not."""
    x0, y0, x1, y1 = box
    filled = lambda x, y: image.getpixel((x, y)) != S.BACKGROUND  # noqa: E731
    if filled(x0, y1):
        return "square" if filled(x0, y0) else "triangle"
    k = round(0.2 * (x1 - x0))
    return "circle" if filled(x0 + k, y0 + k) else "cross"


def _blobs(image: Image.Image) -> Counter:
    """Connected (4-neighbour) regions per colour name."""
    rgb_to_name = {rgb: name for name, (rgb, _, _) in S.COLOURS.items()}
    w, h = image.size
    px, seen, blobs = image.load(), set(), Counter()
    for start in ((x, y) for y in range(h) for x in range(w)):
        if start in seen or px[start] == S.BACKGROUND:
            continue
        blobs[rgb_to_name[px[start]]] += 1
        stack, colour = [start], px[start]
        seen.add(start)
        while stack:
            x, y = stack.pop()
            for nb in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                if 0 <= nb[0] < w and 0 <= nb[1] < h and nb not in seen and px[nb] == colour:
                    seen.add(nb)
                    stack.append(nb)
    return blobs


def test_scenes_images_and_questions_are_deterministic():
    a, b = S.make_scenes(20, seed=3), S.make_scenes(20, seed=3)
    assert a == b and a[:5] == S.make_scenes(5, seed=3) and S.scene_at(3, 7) == a[7]
    assert [_png(S.render(s)) for s in a] == [_png(S.render(s)) for s in b]
    assert S.make_scenes(20, seed=4) != a
    for lang in S.LANGS:
        first, again = S.vqa_items(a, lang, per_scene=2, seed=1), S.vqa_items(b, lang, per_scene=2, seed=1)
        assert [(i["id"], i["question"], i["answers"]) for i in first] == \
            [(i["id"], i["question"], i["answers"]) for i in again]
    # the same question is picked in both languages: ids align
    assert [i["id"] for i in S.vqa_items(a, "en")] == [i["id"] for i in S.vqa_items(a, "ja")]
    problems = P.make_problems(30, seed=5)
    assert problems == P.make_problems(30, seed=5) and problems[:4] == P.make_problems(4, seed=5)


@pytest.mark.parametrize("size", [16, 32, 48])
def test_answers_match_the_rendered_pixels(size):
    for scene in S.make_scenes(60, seed=11, size=size):
        image = S.render(scene)
        assert image.size == (size, size)
        blobs = _blobs(image)
        assert sum(blobs.values()) == len(scene.shapes)
        for s in scene.shapes:
            cx, cy = (s.box[0] + s.box[2]) // 2, (s.box[1] + s.box[3]) // 2
            assert image.getpixel((cx, cy)) == S.COLOURS[s.colour][0]
            assert _kind_from_pixels(image, s.box) == s.kind
        for item in S.vqa_items([scene], "en", per_scene=None):
            spec = item["id"].removeprefix(scene.id + "-")
            kind, _, arg = spec.partition("-")
            arg = arg.replace("_", " ")
            if kind == "count_all":
                assert item["answers"][0] == str(sum(blobs.values()))
            elif kind == "colour_of":
                (shape,) = [s for s in scene.shapes if _kind_from_pixels(image, s.box) == arg]
                rgb = image.getpixel(((shape.box[0] + shape.box[2]) // 2, (shape.box[1] + shape.box[3]) // 2))
                assert S.COLOURS[item["answers"][0]][0] == rgb


def test_no_question_kind_can_be_answered_without_the_picture():
    """A blind model's best guess per question kind (its most common answer) is right on at most ~1/4 of
    the items of that kind, so a VQA score well above that needs the image."""
    from collections import Counter

    by_kind: dict[str, Counter] = {}
    for item in S.vqa_items(S.make_scenes(8000, seed=5), "ja", per_scene=1, seed=5):
        kind = item["id"].split("-")[2]
        by_kind.setdefault(kind, Counter())[(item["question"], item["answers"][0])] += 1
    assert set(by_kind) == set(S.QUESTION_KINDS)
    for kind, counts in by_kind.items():
        per_question: dict[str, Counter] = {}
        for (question, answer), n in counts.items():
            per_question.setdefault(question, Counter())[answer] += n
        hits = sum(c.most_common(1)[0][1] for c in per_question.values())
        assert hits / sum(counts.values()) <= 0.3, kind


def test_japanese_answers_are_japanese_and_score_well_under_mecab_rouge():
    from vlmerge.eval.rouge import rouge_item
    from vlmerge.eval.text import is_japanese

    items = S.vqa_items(S.make_scenes(80, seed=2), "ja", per_scene=None)
    en = {i["id"]: i for i in S.vqa_items(S.make_scenes(80, seed=2), "en", per_scene=None)}
    assert {i["id"].split("-")[2] for i in items} == set(S.QUESTION_KINDS)
    for item in items:
        assert JAPANESE.search(item["question"]) and all(JAPANESE.search(a) for a in item["answers"])
        assert is_japanese(item["answers"][0])
        assert not is_japanese(en[item["id"]]["answers"][0]), "an English answer would pass the gate"
        assert rouge_item(item["answers"][0], item["answers"])["rougeL"] == 1.0
    ref = ["赤い丸です。", "赤い丸"]
    near_miss, wrong = rouge_item("青い丸です。", ref)["rougeL"], rouge_item("緑の四角です。", ref)["rougeL"]
    assert 0.0 < wrong < near_miss < 1.0


def test_word_problems_answers_and_difficulty_knobs():
    config = P.ProblemConfig(operand_range=(10, 20), ops=("+", "-", "×"), factor_range=(3, 4))
    problems = P.make_problems(200, seed=9, config=config)
    assert {p.op for p in problems} == {"+", "-", "×"}
    for p in problems:
        lo, hi = (3, 4) if p.op == "×" else (10, 20)
        assert lo <= p.b <= hi and p.answer >= lo
        for lang in ("en", "ja"):
            worked = P.worked_answer(p, lang)
            assert re.findall(r"\d+", worked)[-1] == P.answer_text(p) == str(OPERATIONS[p.op](p.a, p.b))
            assert str(p.a) in P.question(p, lang) and str(p.b) in P.question(p, lang)
        assert JAPANESE.search(P.question(p, "ja")) and not JAPANESE.search(P.question(p, "en"))
    ken = P.Problem("x", "+", 3, 4, "Ken", "Yumi", "apple", 0)
    assert P.worked_answer(ken, "ja") == "3 + 4 = 7。答えは7です。"
    assert P.question(ken, "ja") == "ケンはりんごを3個持っていて、4個買いました。りんごは全部で何個ですか？"
    with pytest.raises(VlmergeError, match="ops"):
        P.ProblemConfig(ops=("/",))
    with pytest.raises(VlmergeError, match="operand_range"):
        P.ProblemConfig(operand_range=(5, 2))


def test_training_mixtures_keep_each_skill_in_its_own_model():
    ja = T.japanese_llm_sft(120, seed=1)
    assert {e.task for e in ja} == set(T.JA_SFT_MIX)
    for e in ja:  # Japanese replies only, and never an operation
        assert JAPANESE.search(e.completion) and not re.search("[A-Za-z+×=]", e.completion)
    vqa = T.english_vqa_sft(30, seed=1)
    assert all(e.scene is not None and e.prompt.startswith(IMAGE) for e in vqa)
    assert not any(JAPANESE.search(e.text) for e in vqa + T.english_math_sft(30, seed=1))
    base = T.base_corpus(200, seed=1)
    assert any(JAPANESE.search(d) for d in base) and any(re.search("[A-Za-z]", d) for d in base)
    assert not any(re.search(r"答え|answer|=|\nA:", d) for d in base)
    assert T.describe(S.Scene("x", 32, (S.Shape("circle", "red", "top left", (1, 1, 9, 9)),)), "ja") == \
        "左上に赤い丸があります。"
    with pytest.raises(VlmergeError, match="poetry"):
        T.japanese_llm_sft(4, seed=0, mix={"poetry": 1.0})


def test_tokenizer_round_trips_both_languages_with_stable_ids(tmp_path):
    tok = build_tokenizer()
    assert vocabulary(0) == vocabulary(1), "ids must not depend on the corpus seed"
    assert hashlib.sha256("\n".join(vocabulary()).encode()).hexdigest() == VOCAB_SHA256
    assert len(tok) < 400
    assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.image_token_id] == \
        list(range(5))
    corpus = T.tokenizer_corpus(seed=7, n=80)
    assert any(JAPANESE.search(x) for x in corpus) and any(" " in x for x in corpus)
    for text in corpus:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == text
    ids = tok("<image>\nQ: 丸は何色ですか？\nA: 3 + 4 = 7. The answer is 7.")["input_ids"]
    assert ids[:2] == [tok.bos_token_id, tok.image_token_id] and tok.eos_token_id not in ids
    three = tok.convert_tokens_to_ids("3")
    assert three in tok("りんごを3個")["input_ids"] and three in tok("3 + 4")["input_ids"]
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("赤い丸です。 red circle")["input_ids"] == tok("赤い丸です。 red circle")["input_ids"]
    assert loaded.image_token_id == tok.image_token_id


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_eval_sets_are_disjoint_complete_and_manifested(tmp_path):
    config = EvalSetConfig(seed=2, vqa_search_size=12, vqa_heldout_size=20, math_search_size=10,
                           math_heldout_size=14, canvas=24)
    vqa_dir, math_dir = write_eval_sets(tmp_path, config)
    vqa = {s: _rows(vqa_dir / f"{s}.jsonl") for s in ("search", "heldout")}
    assert [len(vqa["search"]), len(vqa["heldout"])] == [12, 20]
    seen = set()
    for rows in vqa.values():
        for row in rows:
            assert set(row) == {"id", "image", "question", "answers"}
            assert row["image"] == f"images/{row['id']}.png"
            with Image.open(vqa_dir / row["image"]) as image:
                key = (image.convert("RGB").tobytes(), row["question"])
            assert key not in seen
            seen.add(key)
    assert not {r["id"] for r in vqa["search"]} & {r["id"] for r in vqa["heldout"]}
    math = {s: _rows(math_dir / f"{s}.jsonl") for s in ("search", "heldout")}
    questions = [r["question"] for rows in math.values() for r in rows]
    assert [len(math["search"]), len(math["heldout"])] == [10, 14]
    assert len(questions) == len(set(questions)) == 24 and all(JAPANESE.search(q) for q in questions)
    for row in (r for rows in math.values() for r in rows):
        assert set(row) == {"id", "question", "answer"} and row["answer"].isdigit()
    for folder, sizes in ((vqa_dir, {"search": 12, "heldout": 20}), (math_dir, {"search": 10, "heldout": 14})):
        verify_manifest(folder)
        manifest = json.loads((folder / "MANIFEST.json").read_text(encoding="utf-8"))
        assert manifest["splits"] == sizes and manifest["license"] == "CC0-1.0"
        assert "--seed 2" in manifest["source"] and "--math-heldout-size 14" in manifest["source"]
        assert not list(tmp_path.glob(".*"))
    (math_dir / "search.jsonl").write_text("{}\n", encoding="utf-8")
    with pytest.raises(VlmergeError, match="search.jsonl: sha256 differs"):
        verify_manifest(math_dir)


def test_shipped_eval_sets_match_their_manifest_and_the_generator(tmp_path):
    main(["--out", str(tmp_path)])
    for name in ("toy_vqa_ja", "toy_math_ja"):
        shipped, fresh = REPO / "eval_data" / name, tmp_path / name
        verify_manifest(shipped)
        assert sum(p.stat().st_size for p in shipped.rglob("*") if p.is_file()) < 1_000_000
        for split in ("search", "heldout"):
            assert (shipped / f"{split}.jsonl").read_bytes() == (fresh / f"{split}.jsonl").read_bytes()
        for png in sorted((fresh / "images").glob("*.png")) if name == "toy_vqa_ja" else []:
            with Image.open(png) as a, Image.open(shipped / "images" / png.name) as b:
                assert a.convert("RGB").tobytes() == b.convert("RGB").tobytes()


def test_bad_input_is_refused_with_the_culprit_named():
    with pytest.raises(VlmergeError, match="'fr'"):
        S.vqa_items(S.make_scenes(1, 0), "fr")
    with pytest.raises(VlmergeError, match="8 px"):
        S.make_scenes(1, 0, size=8)
    with pytest.raises(VlmergeError, match="vqa_heldout_size"):
        EvalSetConfig(vqa_heldout_size=0)
    scene = S.make_scenes(1, 0)[0]
    with pytest.raises(VlmergeError, match=scene.id):
        S.answers(S.QuestionSpec("what_at", "top left"), S.Scene(scene.id, 32, ()), "en")
