"""Dataset loaders on data built here (JSONL + PNGs, hub layouts as parquet/jsonl) and the real MGSM file."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from vlmerge.errors import VlmergeError
from vlmerge.eval.data import (
    LOADERS,
    Dataset,
    ImageRef,
    Item,
    check_images,
    load_dataset,
    resolve_split,
    screen_images,
)

MGSM = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mgsm"
REAL = Path(__file__).resolve().parents[2] / "eval_data" / "real"
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def png_bytes(colour: str, size=(6, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, COLOURS[colour]).save(buffer, "PNG")
    return buffer.getvalue()


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n"
                            for row in rows), encoding="utf-8")  # fmt: skip
    return path


def vqa_rows(prefix: str, colours: list[str]) -> list[dict]:
    return [
        {"id": f"{prefix}{k}", "image": f"img/{c}.png", "question": "何色ですか", "answers": [c, f"{c}です"]}
        for k, c in enumerate(colours)
    ]


@pytest.fixture
def vqa_dir(tmp_path) -> Path:
    root = tmp_path / "vqa"
    (root / "img").mkdir(parents=True)
    for colour in COLOURS:
        (root / "img" / f"{colour}.png").write_bytes(png_bytes(colour))
    write_jsonl(root / "search.jsonl", vqa_rows("s", ["red", "green"]))
    write_jsonl(root / "heldout.jsonl", vqa_rows("h", ["blue", "red", "green"]))
    return root


# ---------------------------------------------------------------- local kinds


def test_vqa_jsonl_folder_reads_items_images_and_default_roles(vqa_dir):
    ds = load_dataset("vqa_jsonl", str(vqa_dir))
    assert (ds.name, sorted(ds.splits), ds.search_split, ds.heldout_split) == (
        "vqa",
        ["heldout", "search"],
        "search",
        "heldout",
    )
    held = ds.split("heldout")
    assert [item.id for item in held] == ["h0", "h1", "h2"]
    assert held[0].answers == ("blue", "blueです") and held[0].question == "何色ですか"
    image = held[0].image.load()
    assert image.mode == "RGB" and image.size == (6, 4) and image.getpixel((0, 0)) == COLOURS["blue"]
    assert held[0].image.path == vqa_dir / "img" / "blue.png"
    write_jsonl(vqa_dir / "inside.jsonl", [{**vqa_rows("i", ["red"])[0], "image": "img/../img/red.png"}])
    inside = load_dataset("vqa_jsonl", str(vqa_dir / "inside.jsonl")).split("inside")[0].image
    assert inside.path == vqa_dir / "img" / "red.png"  # '..' that stays inside the folder is fine
    assert resolve_split(ds, "search") == "search" and resolve_split(ds, "heldout") == "heldout"
    assert [item.id for item in load_dataset("vqa_jsonl", str(vqa_dir), limit=2).split("heldout")] == [
        "h0",
        "h1",
    ]


def test_vqa_jsonl_single_file_takes_its_split_name_from_config(vqa_dir):
    ds = load_dataset("vqa_jsonl", str(vqa_dir / "heldout.jsonl"), splits={"heldout": "test"})
    assert (list(ds.splits), ds.search_split, ds.heldout_split) == (["test"], None, "test")
    plain = load_dataset("vqa_jsonl", str(vqa_dir / "search.jsonl"))
    assert (list(plain.splits), plain.search_split, plain.heldout_split) == (["search"], "search", None)
    with pytest.raises(VlmergeError, match="one file, so one split"):
        load_dataset("vqa_jsonl", str(vqa_dir / "search.jsonl"), splits={"search": "a", "heldout": "b"})


def test_dataset_yaml_declares_roles_and_extra_fields_go_to_meta(tmp_path):
    root = tmp_path / "d"
    rows = [{"id": 1, "image": "a.png", "question": "q", "answers": ["x"], "category": "colour"}]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "test.jsonl", [{**rows[0], "id": 2}])
    (root / "a.png").write_bytes(png_bytes("red"))
    (root / "dataset.yaml").write_text("name: toy\nsearch_split: train\nheldout_split: test\n")
    ds = load_dataset("vqa_jsonl", str(root))
    assert (ds.name, ds.search_split, ds.heldout_split) == ("toy", "train", "test")
    assert ds.split("train")[0].id == "1" and ds.split("train")[0].meta == {"category": "colour"}
    (root / "dataset.yaml").write_text("search_split: dev\n")
    with pytest.raises(VlmergeError, match=r"search split 'dev' does not exist.*\['test', 'train'\]"):
        load_dataset("vqa_jsonl", str(root))
    (root / "dataset.yaml").write_text("search_splits: train\n")
    with pytest.raises(VlmergeError, match="search_splits"):
        load_dataset("vqa_jsonl", str(root))


def test_math_jsonl_answers_are_strings(tmp_path):
    path = write_jsonl(tmp_path / "m" / "search.jsonl", [
        {"id": 7, "question": "1+1は？", "answer": 2},
        {"id": "b", "question": "3,000+2,600は？", "answer": "5,600", "source": "toy"},
    ])  # fmt: skip
    ds = load_dataset("math_jsonl", str(path.parent))
    items = ds.split("search")
    assert [(i.id, i.answers, i.image) for i in items] == [("7", ("2",), None), ("b", ("5,600",), None)]
    assert items[1].meta == {"source": "toy"} and ds.heldout_split is None


def test_jsonl_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "m" / "search.jsonl"
    path.parent.mkdir()
    good = json.dumps({"id": 1, "question": "1+1は？", "answer": 2}, ensure_ascii=False).encode()
    path.write_bytes(good + b"\n" + '{"id": 2, "question": "2+2は？", "answer": 4}\n'.encode("shift_jis"))
    with pytest.raises(VlmergeError) as err:
        load_dataset("math_jsonl", str(path.parent))
    assert str(err.value) == f"{path}:2: not UTF-8 text (byte 0x82); save the file as UTF-8"
    tsv = tmp_path / "mgsm.tsv"
    tsv.write_bytes("1+1は？\t2\n".encode() + "2+2は？\t4\n".encode("shift_jis"))
    with pytest.raises(VlmergeError, match=r"mgsm.tsv:2: not UTF-8 text"):
        load_dataset("mgsm_tsv", str(tsv))
    (path.parent / "dataset.yaml").write_bytes("name: 数学\n".encode("shift_jis"))
    with pytest.raises(VlmergeError, match=r"dataset.yaml:1: not UTF-8 text"):
        load_dataset("math_jsonl", str(path.parent))


@pytest.mark.skipif(not (MGSM / "mgsm_ja.tsv").is_file(), reason="needs ../shared/data/mgsm beside the repo")
def test_real_mgsm_ja_is_one_heldout_split_of_250(caplog):
    ds = load_dataset("mgsm_tsv", str(MGSM / "mgsm_ja.tsv"))
    test = ds.split("test")
    assert len(test) == 250 and [item.id for item in test] == [str(k) for k in range(250)]
    assert test[0].answers == ("18",) and test[0].question.startswith("ジャネットのアヒル")
    assert test[-1].answers == ("5,600",)  # kept as written; the metric reads thousands separators
    assert (ds.name, ds.search_split, ds.heldout_split) == ("mgsm_ja", None, "test")
    assert resolve_split(ds, "heldout") == "test"
    with pytest.raises(VlmergeError, match="declares no search split"):
        resolve_split(ds, "search")
    with pytest.raises(VlmergeError, match="has no split 'search'.*search split: none declared"):
        ds.split("search")
    with caplog.at_level(logging.WARNING, logger="vlmerge.eval.data"):
        assert resolve_split(ds, "search", allow_heldout_as_fitness=True) == "test"
    assert "NOT a held-out result" in caplog.text
    english = load_dataset("mgsm_tsv", str(MGSM / "mgsm_en.tsv"), limit=5)
    assert [item.id for item in english.split("test")] == ["0", "1", "2", "3", "4"]
    assert english.split("test")[0].answers == ("18",)


def test_mgsm_tsv_rejects_a_line_without_tab(tmp_path):
    path = tmp_path / "mgsm_xx.tsv"
    path.write_text("q1\t1\nno tab here\n", encoding="utf-8")
    with pytest.raises(VlmergeError, match=r"mgsm_xx.tsv:2: expected 'question<TAB>answer'"):
        load_dataset("mgsm_tsv", str(path))


# ---------------------------------------------------------------- hub layouts, built locally with `datasets`


def save_parquet(rows: dict, features, path: Path) -> None:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))


def vg_features():
    from datasets import Features, List, Value
    from datasets import Image as HubImage

    qa = {"a_objects": List(Value("null")), "answer": Value("string"), "q_objects": List(Value("null")),
          "qa_id": Value("int64"), "question": Value("string")}  # fmt: skip
    return Features(
        {"image_id": Value("int64"), "url": Value("string"), "qas": List(qa), "image": HubImage()}
    )


def vg_rows(image_ids: list[int], colours: list[str], n_qas: list[int]) -> dict:
    def qa(i: int, c: str, k: int) -> dict:
        return {
            "a_objects": [],
            "answer": f"{c}{k}",
            "q_objects": [],
            "qa_id": 100 * i + k,
            "question": f"質問{k}",
        }

    qas = [[qa(i, c, k) for k in range(n)] for i, c, n in zip(image_ids, colours, n_qas)]
    images = [{"bytes": png_bytes(c), "path": None} for c in colours]
    return {"image_id": image_ids, "url": [f"u{i}" for i in image_ids], "qas": qas, "image": images}


@pytest.fixture
def vg_dir(tmp_path) -> Path:
    root = tmp_path / "JA-VG-VQA-500"
    save_parquet(
        vg_rows([1, 2], ["red", "green"], [2, 1]), vg_features(), root / "data/test-00000-of-00001.parquet"
    )
    save_parquet(vg_rows([5], ["blue"], [3]), vg_features(), root / "data/train-00000-of-00001.parquet")
    return root


def test_ja_vg_vqa_gives_one_item_per_question(vg_dir):
    ds = load_dataset("ja_vg_vqa", str(vg_dir), revision="aa13b70cd939faa1783187a752be2c0ca0d8303b")
    assert (ds.name, ds.search_split, ds.heldout_split) == ("JA-VG-VQA-500", "train", "test")
    test = ds.split("test")
    assert [(i.id, i.question, i.answers) for i in test] == [
        ("1-0", "質問0", ("red0",)), ("1-1", "質問1", ("red1",)), ("2-0", "質問0", ("green0",))
    ]  # fmt: skip
    assert test[2].meta["qa_id"] == 200 and test[2].meta["image_id"] == 2
    assert test[2].image.load().getpixel((1, 1)) == COLOURS["green"]
    assert [i.id for i in ds.split("train")] == ["5-0", "5-1", "5-2"]
    first = load_dataset("ja_vg_vqa", str(vg_dir), options={"qas": "first"})
    assert [i.id for i in first.split("test")] == ["1-0", "2-0"]
    swapped = load_dataset("ja_vg_vqa", str(vg_dir), splits={"search": None}, limit=1)
    assert (list(swapped.splits), swapped.search_split, len(swapped.split("test"))) == (["test"], None, 1)
    with pytest.raises(VlmergeError, match="option qas must be 'all' or 'first'"):
        load_dataset("ja_vg_vqa", str(vg_dir), options={"qas": "some"})
    with pytest.raises(VlmergeError, match=r"has no option\(s\) \['qa'\]; its options: \['qas'\]"):
        load_dataset("ja_vg_vqa", str(vg_dir), options={"qa": "first"})


def test_ja_vlm_wild_is_heldout_only(tmp_path):
    from datasets import Features, Value
    from datasets import Image as HubImage

    features = Features({"page_url": Value("string"), "image_url": Value("string"), "image": HubImage(),
                         "question": Value("string"), "answer": Value("string")})  # fmt: skip
    image = {"bytes": png_bytes("red"), "path": None}
    rows = {"page_url": ["p0", "p1"], "image_url": ["i0", "i1"], "question": ["何が見えますか", "色は"],
            "answer": ["鳥居です", "赤"], "image": [image, image]}  # fmt: skip
    save_parquet(rows, features, tmp_path / "wild" / "data" / "test-00000-of-00001.parquet")
    # the hub snapshot also holds a root parquet outside the card's configs: it must not become a split
    save_parquet({"x": [1]}, None, tmp_path / "wild" / "data_per_image.parquet")
    (tmp_path / "wild" / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: test\n    path: data/test-*\n---\n"
    )
    ds = load_dataset("ja_vlm_wild", str(tmp_path / "wild"))
    assert (list(ds.splits), ds.search_split, ds.heldout_split) == (["test"], None, "test")
    assert [i.id for i in ds.split("test")] == ["0", "1"]
    assert ds.split("test")[0].answers == ("鳥居です",) and ds.split("test")[1].meta["page_url"] == "p1"
    assert ds.split("test")[1].image.load().size == (6, 4)
    with pytest.raises(VlmergeError, match="declares no search split"):
        resolve_split(ds, "search")


def test_gsm8k_ja_is_the_fitness_set(tmp_path):
    root = tmp_path / "gsm8k-ja"
    write_jsonl(root / "gsm8k-ja-test_250-1319.jsonl", [
        {"question": "りんごが3個…", "answer": "3+2=5\n#### 5", "answer_number": "5"},
        {"question": "みかんが…", "answer": "…\n#### 1,200", "answer_number": None},
        {"question": "なしが…", "answer": " 7 "},
    ])  # fmt: skip
    ds = load_dataset("gsm8k_ja", str(root))
    items = ds.split("test")
    assert (ds.search_split, ds.heldout_split) == ("test", None)
    assert [(i.id, i.answers) for i in items] == [("0", ("5",)), ("1", ("1,200",)), ("2", ("7",))]
    assert items[0].meta["solution"].endswith("#### 5") and items[0].image is None
    assert resolve_split(ds, "search") == "test"
    with pytest.raises(VlmergeError, match="declares no held-out split"):
        resolve_split(ds, "heldout")
    write_jsonl(root / "gsm8k-ja-test_250-1319.jsonl", [{"question": "q", "answer": "costs 5 yen"}])
    with pytest.raises(VlmergeError, match=r"split 'test' row 0: missing field 'answer_number'"):
        load_dataset("gsm8k_ja", str(root))


def test_hub_errors_name_the_culprit(vg_dir, tmp_path):
    with pytest.raises(VlmergeError, match="cannot load hub dataset 'SakanaAI/JA-VG-VQA-500'.*local folder"):
        load_dataset("ja_vg_vqa", "SakanaAI/JA-VG-VQA-500")  # tests run offline (conftest)
    with pytest.raises(VlmergeError, match=r"split 'test': missing column\(s\) \['question', 'answer'\]"):
        load_dataset("ja_vlm_wild", str(vg_dir))
    with pytest.raises(VlmergeError, match="neither a local folder nor a hub id"):
        load_dataset("gsm8k_ja", str(tmp_path / "missing" / "dir"))


# ---------------------------------------------------------------- bad input: one message naming the culprit


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"id": "a", "image": "x.png", "answers": ["y"]}'], r"search.jsonl:1: missing field 'question'"),
        (['{"id": "a", "image": "x.png", "question": "q", "answers": []}', "{not json"],
         r"search.jsonl:1: field 'answers' must be a non-empty list"),
        (['{"id": "a", "image": "x.png", "question": "q", "answers": ["y"]}', "", "{not json"],
         r"search.jsonl:3: invalid JSON"),
        (["[1, 2]"], r"search.jsonl:1: expected a JSON object, got list"),
        (['{"id": "a", "image": "../x.png", "question": "q", "answers": ["y"]}'],
         r"item 'a': image path '../x.png' escapes the data folder"),
        (['{"id": "b", "image": "/etc/x.png", "question": "q", "answers": ["y"]}'],
         r"item 'b': image path '/etc/x.png' escapes the data folder"),
        (['{"id": "a", "image": "x.png", "question": "q", "answers": ["y"]}'] * 2,
         r"split 'search' \(.*search.jsonl\) has duplicate item ids: \['a'\]"),
        ([""], r"split 'search' \(.*search.jsonl\) has no items"),
    ],
)  # fmt: skip
def test_bad_jsonl_lines(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "d" / "search.jsonl", lines)
    with pytest.raises(VlmergeError, match=message):
        load_dataset("vqa_jsonl", str(path.parent))


def test_bad_arguments(tmp_path, vqa_dir):
    with pytest.raises(
        VlmergeError, match=r"unknown dataset kind 'csv'; known kinds: \['gsm8k_ja', .*'vqa_jsonl'\]"
    ):
        load_dataset("csv", str(vqa_dir))
    with pytest.raises(VlmergeError, match="dataset not found: .*nope"):
        load_dataset("math_jsonl", str(tmp_path / "nope"))
    with pytest.raises(VlmergeError, match="MGSM file not found"):
        load_dataset("mgsm_tsv", str(tmp_path / "mgsm.tsv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlmergeError, match="empty has no <split>.jsonl files"):
        load_dataset("vqa_jsonl", str(tmp_path / "empty"))
    with pytest.raises(VlmergeError, match="limit must be a positive integer"):
        load_dataset("vqa_jsonl", str(vqa_dir), limit=0)
    with pytest.raises(VlmergeError, match=r"unknown split role\(s\) \['fitness'\]"):
        load_dataset("vqa_jsonl", str(vqa_dir), splits={"fitness": "search"})
    with pytest.raises(
        VlmergeError, match=r"heldout split 'test' does not exist; its splits are \['heldout', 'search'\]"
    ):
        load_dataset("vqa_jsonl", str(vqa_dir), splits={"heldout": "test"})


# ---------------------------------------------------------------- the held-out rule


def test_heldout_as_fitness_is_refused_unless_allowed(vqa_dir, caplog):
    ds = load_dataset("vqa_jsonl", str(vqa_dir), splits={"search": "heldout"})
    with pytest.raises(VlmergeError, match="split 'heldout' is the held-out split and 'search' asks for it"):
        resolve_split(ds, "search")
    with caplog.at_level(logging.WARNING, logger="vlmerge.eval.data"):
        assert resolve_split(ds, "search", allow_heldout_as_fitness=True) == "heldout"
    assert any(
        r.levelno == logging.WARNING and "allow_heldout_as_fitness" in r.getMessage() for r in caplog.records
    )
    assert resolve_split(ds, "heldout") == "heldout"
    with pytest.raises(VlmergeError, match="has no split 'dev'"):
        resolve_split(ds, "dev")


def test_heldout_split_asked_by_name_is_a_fitness_request(caplog):
    one = [Item("0", "q", ("a",))]
    ds = Dataset("x", {"train": one, "test": one}, "train", "test")
    assert resolve_split(ds, "train") == "train" and resolve_split(ds, "heldout") == "test"
    with pytest.raises(
        VlmergeError, match="split 'test' is the held-out split and 'test' asks for it.*role 'heldout'"
    ):
        resolve_split(ds, "test")
    with caplog.at_level(logging.WARNING, logger="vlmerge.eval.data"):
        assert resolve_split(ds, "test", allow_heldout_as_fitness=True) == "test"
    assert "NOT a held-out result" in caplog.text
    neither = Dataset("y", {"train": one}, None, None)
    with pytest.raises(VlmergeError, match="declares no search split"):
        resolve_split(neither, "search", allow_heldout_as_fitness=True)


# ---------------------------------------------------------------- images


def items_with_images(tmp_path, n_bad: int) -> list[Item]:
    (tmp_path / "ok.png").write_bytes(png_bytes("red"))
    good = [Item("good", "q", ("a",), ImageRef(path=tmp_path / "ok.png")), Item("text", "q", ("a",))]
    bad = [Item(f"bad{k}", "q", ("a",), ImageRef(data=b"not a png")) for k in range(n_bad - 1)]
    return good + bad + [Item("gone", "q", ("a",), ImageRef(path=tmp_path / "gone.png"))]


def test_check_images_reports_missing_and_undecodable(tmp_path):
    bad = check_images(items_with_images(tmp_path, 2))
    assert [item_id for item_id, _ in bad] == ["bad0", "gone"]
    assert "UnidentifiedImageError" in bad[0][1] and bad[1][1] == f"missing file {tmp_path / 'gone.png'}"
    with pytest.raises(VlmergeError, match=r"cannot read image <9 bytes>"):
        ImageRef(data=b"not a png").load()
    assert ImageRef(pil=Image.new("L", (2, 2), 7)).load().getpixel((0, 0)) == (7, 7, 7)


def test_screen_images_refuses_or_skips_with_a_count(tmp_path, caplog):
    items = items_with_images(tmp_path, 25)
    with pytest.raises(VlmergeError) as refused:
        screen_images(items, what="toy/search")
    message = str(refused.value)
    assert message.startswith("25 item(s) in toy/search have missing or undecodable images: bad0 (")
    assert "bad19 (" in message and "bad20 (" not in message and "and 5 more" in message
    assert "skip_bad_items" in message
    with caplog.at_level(logging.WARNING, logger="vlmerge.eval.data"):
        skipped = screen_images(items, skip_bad_items=True)
    assert skipped == frozenset({f"bad{k}" for k in range(24)} | {"gone"})
    assert "25 item(s) have missing or undecodable images" in caplog.text
    assert screen_images(items[:2]) == frozenset()


def test_dataset_refuses_a_role_naming_a_missing_split():
    with pytest.raises(VlmergeError, match="dataset 'x': heldout split 'test' does not exist"):
        Dataset("x", {"train": [Item("0", "q", ("a",))]}, "train", "test")


# ---------------------------------------------------------------- manifests of the real sets


def test_real_set_manifests_match_the_loaders():
    manifests = sorted(REAL.glob("*.json"))
    expected = {"ja_vg_vqa_500", "ja_vlm_bench_in_the_wild", "gsm8k_ja_test_250_1319", "mgsm_ja"}
    assert {path.stem for path in manifests} >= expected
    for path in manifests:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        assert manifest["kind"] in LOADERS, path
        for role in ("search_split", "heldout_split"):
            split = manifest[role]
            assert split is None or split in manifest["splits"], (path, role)
        assert manifest["search_split"] != manifest["heldout_split"], path
        assert manifest["license"] and all(s["used_for"] for s in manifest["splits"].values()), path
    mgsm = json.loads((REAL / "mgsm_ja.json").read_text(encoding="utf-8"))
    if (MGSM / "mgsm_ja.tsv").is_file():
        import hashlib

        assert hashlib.sha256((MGSM / "mgsm_ja.tsv").read_bytes()).hexdigest() == mgsm["sha256"]
        ds = load_dataset(mgsm["kind"], str(MGSM / "mgsm_ja.tsv"))
        assert len(ds.split("test")) == mgsm["splits"]["test"]["items"]
