"""The toy VQA probe: answers read in any language, per question kind, against the blind guess."""

import subprocess
import sys
from pathlib import Path

import pytest

from vlmerge.errors import VlmergeError
from vlmerge.eval.data import Item
from vlmerge.toy import scenes as S
from vlmerge.toy.splits import EvalSetConfig
from vlmerge.toy.vqa_probe import (
    VqaItem,
    as_japanese,
    begins_right,
    blind_row,
    first_token,
    is_right,
    main,
    probe,
    read_items,
    table,
)

ROOT = Path(__file__).resolve().parents[2]
MODELS, DATA = ROOT / "eval_data" / "toy_models", ROOT / "eval_data" / "toy_vqa_ja"


@pytest.mark.parametrize("english, japanese", [
    ("red", "赤"), ("a red circle", "赤い丸"), ("It is yellow.", "黄色"), ("an orange triangle", "オレンジの三角"),
    ("cross", "十字"), ("at the top left", "左上"), ("bottom", "下"), ("2", "2つ"), ("three", "3つ"),
    ("1 shape", "1つ"), ("4 shapes", "4つ"), ("banana", "banana"), ("red red", "red red"),
])
def test_as_japanese_reads_english_toy_answers(english, japanese):
    assert as_japanese(english) == japanese


def _item(kind, answers):
    return VqaItem(kind, "What is at the top?", Item(f"s0-00000-{kind}", "上には何がありますか？", tuple(answers)))


def test_is_right_accepts_either_language_and_the_polite_ending():
    item = _item("what_at", ["赤い丸です。", "赤い丸"])
    assert is_right("赤い丸", item) and is_right("赤い丸です。", item) and is_right("a red circle", item)
    assert not is_right("青い丸", item) and not is_right("red square", item) and not is_right("", item)


def test_begins_right_compares_the_first_token_in_either_language():
    assert first_token("赤い丸です。") == "赤" and first_token(" 12つ") == "1" and first_token("top left") == "top"
    assert first_token("") == ""
    item = _item("where_is", ["左上です。", "左上"])
    assert begins_right("左上", item) and begins_right("左下", item) and begins_right("top left", item)
    assert not begins_right("右上", item) and not begins_right("bottom right", item) and not begins_right("", item)
    colour = _item("colour_of", ["赤です。", "赤"])
    assert begins_right("赤い丸", colour) and not is_right("赤い丸", colour)


def test_blind_row_is_the_share_of_each_kinds_most_common_answer():
    items = [_item("colour_of", [a]) for a in ("赤", "赤", "赤", "青")] + [_item("count_all", ["1つ"])]
    items += [_item("where_is", [a]) for a in ("左上", "左下", "右上")]
    row = blind_row(items)
    assert row.right == {"colour_of": 0.75, "where_is": 1 / 3, "count_all": 1.0, "all": 5 / 8}
    assert row.begins == {"colour_of": 0.75, "where_is": 2 / 3, "count_all": 1.0, "all": 6 / 8}
    assert row.japanese is None


def test_read_items_rebuilds_each_question_from_its_id():
    items = read_items(DATA, "heldout", limit=40)
    assert len(items) == 40 and {it.kind for it in items} == set(S.QUESTION_KINDS)
    for it in items:
        seed, index = (int(x) for x in it.item.id[1:].split("-")[:2])
        scene = S.scene_at(seed, index, size=EvalSetConfig().canvas)
        spec = next(s for s in S.question_specs(scene) if it.item.id.endswith(s.slug))
        assert S.vqa_item(scene, spec, "ja")["question"] == it.item.question  # the id was parsed right
        assert it.question_en == S.question(spec, "en") and it.item.answers == tuple(S.answers(spec, scene, "ja"))


def test_probe_on_the_committed_world_separates_sight_from_form():
    rows = {r.name: r for r in probe(MODELS, [], DATA, "heldout", 60)}
    assert list(rows) == ["blind", "vlm_en (English questions)", "vlm_en", "tower swap (lm_ja)"]
    blind, english, tower = rows["blind"], rows["vlm_en (English questions)"], rows["tower swap (lm_ja)"]
    assert english.right["all"] >= blind.right["all"] + 0.25  # the VLM sees, in English
    assert english.japanese == 0.0 and rows["vlm_en"].japanese <= 0.1
    assert tower.japanese >= 0.9 and tower.right["all"] <= blind.right["all"] + 0.15  # Japanese, but blind
    assert english.begins["all"] >= english.right["all"] and english.begins["all"] >= blind.begins["all"] + 0.2
    lines = table(list(rows.values())).splitlines()
    assert lines[0].split() == ["model", *S.QUESTION_KINDS, "all", "japanese", "first", "reply"] and len(lines) == 5
    begins = table(list(rows.values()), "begins").splitlines()
    assert begins[0].split() == ["model", *S.QUESTION_KINDS, "all"]
    assert begins[2].split()[-1] == f"{100 * english.begins['all']:.1f}"


def test_probe_refuses_bad_input(tmp_path):
    with pytest.raises(VlmergeError, match="--n 0"):
        probe(MODELS, [], DATA, "heldout", 0)
    with pytest.raises(VlmergeError, match="nowhere"):
        probe(MODELS, [], DATA, "nowhere", 4)
    with pytest.raises(VlmergeError, match=str(tmp_path)):
        main(["--models", str(tmp_path), "--n", "2"])


def test_probe_command_ends_bad_input_with_one_error_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vlmerge.toy.vqa_probe", "--data", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
