"""Task data that is not there (or not given) is refused naming the config key that set it (task.data,
heldout_task.data) and the path; other data errors, and loaders called directly, keep their own messages."""

from __future__ import annotations

import pytest

from tests.eval.test_task import task_config
from vlmerge.candidates import instantiate_heldout_task
from vlmerge.errors import VlmergeError
from vlmerge.eval.data import DataNotFound, load_dataset
from vlmerge.eval.task import Task, instantiate_task


def data_refusal(task: Task, split: str) -> str:
    with pytest.raises(VlmergeError) as err:
        task.prepare(split)
    assert not isinstance(err.value, DataNotFound)  # the Task's message, not the loader's
    return str(err.value)


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("toy_math_ja", "/nope/math",
         "task.data: dataset not found: /nope/math (a .jsonl file or a folder of <split>.jsonl files)"),
        ("toy_vqa_ja", "/nope/vqa.jsonl",
         "task.data: dataset not found: /nope/vqa.jsonl (a .jsonl file or a folder of <split>.jsonl files)"),
        ("mgsm_ja", "/nope/mgsm_ja.tsv",
         "task.data: MGSM file not found: /nope/mgsm_ja.tsv (a question<TAB>answer .tsv file)"),
        ("ja_vg_vqa_500", "/nope/vqa",
         "task.data: dataset not found: '/nope/vqa' is neither a local folder nor a hub id (owner/name)"),
    ],
)  # fmt: skip
def test_fitness_task_data_not_found_names_task_data(name, data, message):
    task = instantiate_task(task_config(name, f"task.data={data}"))
    assert data_refusal(task, "heldout") == message


def test_heldout_task_data_not_found_names_heldout_task_data(tmp_path):
    task = instantiate_heldout_task(task_config("mgsm_ja", "task.data=/nope/mgsm_ja.tsv"))
    assert data_refusal(task, "heldout") == (
        "heldout_task.data: MGSM file not found: /nope/mgsm_ja.tsv (a question<TAB>answer .tsv file)")
    empty = tmp_path / "empty"
    empty.mkdir()
    folder = instantiate_heldout_task(task_config("toy_math_ja", f"task.data={empty}"))
    assert data_refusal(folder, "heldout") == f"heldout_task.data: dataset folder {empty} has no <split>.jsonl files"


@pytest.mark.parametrize("data", ["''", "null"])
def test_no_data_names_the_key_to_set(data):
    """The constructor refuses a task without data before it knows its config key; instantiate_task names it."""
    with pytest.raises(VlmergeError) as fitness:
        instantiate_task(task_config("mgsm_ja", f"task.data={data}"))
    assert str(fitness.value) == "task 'mgsm_ja': no data given; set task.data=<hub id or local path>"
    with pytest.raises(VlmergeError) as heldout:
        instantiate_heldout_task(task_config("mgsm_ja", f"task.data={data}"))
    assert str(heldout.value) == (
        "heldout_task: task 'mgsm_ja': no data given; set heldout_task.data=<hub id or local path>")


def test_bad_data_contents_keep_their_file_and_line(tmp_path):
    (tmp_path / "heldout.jsonl").write_text('{"id": 1, "question": "1 + 1"}\n')
    task = instantiate_heldout_task(task_config("toy_math_ja", f"task.data={tmp_path}"))
    with pytest.raises(VlmergeError) as err:
        task.prepare("heldout")
    assert str(err.value) == f"{tmp_path / 'heldout.jsonl'}:1: missing field 'answer'"


def test_loaders_called_directly_keep_their_message():
    with pytest.raises(DataNotFound, match=r"^dataset not found: /nope/math \(a .jsonl file"):
        load_dataset("math_jsonl", "/nope/math")
