"""Tasks as config: every task YAML builds a Task; prompts, post-processing, splits, data, metric checks."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from PIL import Image

from tests.fixtures.tokenizer import IMAGE_TOKEN, build_tokenizer
from vlmerge.errors import VlmergeError
from vlmerge.eval.data import ImageRef, Item
from vlmerge.eval.loading import ModelBundle
from vlmerge.eval.task import Task, instantiate_task
from vlmerge.models.source import ModelRef
from vlmerge.toy.problems import MATH_PROMPT
from vlmerge.toy.scenes import VQA_PROMPT

REPO = Path(__file__).resolve().parents[2]
TASK_DIR = REPO / "conf" / "task"
TASKS = sorted(p.stem for p in TASK_DIR.glob("*.yaml"))
EVOVLM_PROMPT = (
    "[INST] <<SYS>>\nあなたは役立つ、偏見がなく、検閲されていないアシスタントです。"
    "与えられた画像を下に、質問に答えてください。\n<</SYS>>\n\n<image>\n{question} [/INST]"
)
EVOLLM_PROMPT = (
    "以下に、あるタスクを説明する指示があります。リクエストを適切に完了するための回答を日本語で記述してください。"
    "一歩一歩考えましょう。\n\n### 指示:\n{question}\n\n### 応答:"
)


def task_config(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="eval_cli", overrides=[f"task={name}", *overrides]).task


def vqa_dir(
    root: Path, rows: dict[str, list[dict]], *, images: dict[str, bytes | None] | None = None
) -> Path:
    """A VQA JSONL folder: `rows` per split; `images` name -> PNG bytes (None: leave the file out)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    for name, data in (images or {}).items():
        if data is not None:
            (root / "images" / name).write_bytes(data)
    for split, lines in rows.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    return root


def png(colour=(255, 0, 0)) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def row(i: int, image: str | None = None) -> dict:
    return {
        "id": f"q{i}",
        "image": image or f"images/{i}.png",
        "question": "何色ですか？",
        "answers": ["赤です。"],
    }


def text_bundle(
    template: str | None = None, family: str = "causal_lm", image_token: bool = False, adds_bos: bool = False
) -> ModelBundle:
    tokenizer = build_tokenizer([IMAGE_TOKEN] if image_token else None)
    tokenizer.chat_template = template
    if adds_bos:
        from tokenizers import processors

        bos = ("<s>", tokenizer.bos_token_id)
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[bos]
        )
    return ModelBundle(
        model=None, processor=tokenizer, tokenizer=tokenizer, family=family, ref=ModelRef("tiny")
    )


@pytest.mark.parametrize("name", TASKS)
def test_task_configs_are_exactly_the_constructor(name):
    raw = yaml.safe_load((TASK_DIR / f"{name}.yaml").read_text())
    assert raw.pop("_target_") == "vlmerge.eval.task.Task"
    assert set(raw) == set(inspect.signature(Task.__init__).parameters) - {"self"}
    task = instantiate_task(task_config(name, "task.data=anything"))
    assert task.name == name and task.data == "anything"
    assert task.generation.do_sample is False
    task.check_fitness_key()


def test_reference_tasks_carry_the_papers_settings():
    vqa = instantiate_task(task_config("ja_vg_vqa_500"))
    assert (vqa.prompt, vqa.metric_name, vqa.fitness_key) == (EVOVLM_PROMPT, "rouge_ja", "rougeL_ja")
    settings = vqa.generation
    assert (settings.num_beams, settings.repetition_penalty, settings.max_new_tokens) == (5, 1.5, 512)
    assert vqa.loader_options == {"qas": "first"}
    for name in ("mgsm_ja", "gsm8k_ja"):
        math = instantiate_task(task_config(name))
        assert (math.prompt, math.metric_name, math.fitness_key) == (EVOLLM_PROMPT, "math_accuracy", "acc_ja")
        assert math.generation.num_beams == 1 and not math.generation.do_sample
    assert instantiate_task(task_config("gsm8k_ja")).data == "SakanaAI/gsm8k-ja-test_250-1319"
    assert instantiate_task(task_config("mgsm_ja")).loader == "mgsm_tsv"


def test_toy_tasks_use_the_toy_prompts_and_short_greedy_generation():
    for name, prompt in (("toy_vqa_ja", VQA_PROMPT), ("toy_math_ja", MATH_PROMPT)):
        task = instantiate_task(task_config(name))
        assert task.prompt == prompt
        assert task.generation.max_new_tokens <= 64 and task.generation.num_beams == 1
        assert task.first_line


def test_task_overrides_and_bad_config_are_one_error():
    task = instantiate_task(task_config("toy_vqa_ja", "task.batch_size=3", "task.limit=5"))
    assert task.generation.batch_size == 3 and task.limit == 5
    with pytest.raises(VlmergeError, match="unknown metric 'nope'.*math_accuracy"):
        instantiate_task(task_config("toy_vqa_ja", "task.metric=nope"))
    with pytest.raises(VlmergeError, match="num_beams"):
        instantiate_task(task_config("toy_vqa_ja", "task.num_beams=0"))
    with pytest.raises(VlmergeError, match="task config"):
        instantiate_task(task_config("toy_vqa_ja", "+task.beams=3"))


def test_postprocess_cuts_at_stop_takes_first_line_and_strips():
    task = Task("t", "d", "vqa_jsonl", stop=["###"], first_line=True)
    assert task.postprocess("  赤です。\n次の質問 ### x") == "赤です。"
    assert task.postprocess("\n\n 青 ### 赤") == "青"
    raw = Task("t", "d", "vqa_jsonl", strip=False)
    assert raw.postprocess(" a \n b ") == " a \n b "
    for text in (" a\nb", "x ### y", ""):
        once = task.postprocess(text)
        assert task.postprocess(once) == once


def test_a_stop_string_is_one_stop_string():
    task = instantiate_task(task_config("toy_vqa_ja", "task.stop=abc", "task.first_line=false"))
    assert task.generation.stop == ("abc",) == Task("t", "d", "vqa_jsonl", stop="abc").generation.stop
    assert task.postprocess("a b c abc d") == "a b c"
    assert instantiate_task(task_config("toy_vqa_ja", "task.stop=[abc,'###']")).generation.stop == ("abc", "###")
    with pytest.raises(VlmergeError) as err:
        instantiate_task(task_config("toy_vqa_ja", "task.stop=5"))
    assert str(err.value) == (
        "task 'toy_vqa_ja': stop must be a list of strings, got 5; write it as task.stop='[\"STRING\", ...]'"
    )


@pytest.mark.parametrize("prompt", ["{input}", "Q: {question} {", "{question.x}"])
def test_prompt_fields_are_checked(prompt):
    with pytest.raises(VlmergeError, match="prompt"):
        Task("t", "d", "vqa_jsonl", prompt=prompt)


def test_fitness_key_must_be_a_metric_value():
    task = Task("t", "d", "math_jsonl", metric="math_accuracy", fitness_key="rougeL")
    with pytest.raises(VlmergeError, match=r"fitness_key 'rougeL'.*\['acc', 'acc_ja'\]"):
        task.check_fitness_key()
    assert Task("t", "d", "math_jsonl", metric="math_accuracy").fitness_key == "acc_ja"


def test_prompts_place_the_image_token(tmp_path):
    image_item = Item("a", "何色ですか？", ("赤",), ImageRef(path=tmp_path / "x.png"))
    text_item = Item("b", "1 + 1 は？", ("2",))
    vlm = text_bundle(family="composite", image_token=True)
    vqa = Task("t", "d", "vqa_jsonl", prompt="Q: {question}\nA:")
    assert vqa.build_prompt(image_item, vlm) == "<image>\nQ: 何色ですか？\nA:"
    assert Task("t", "d", "vqa_jsonl", prompt=VQA_PROMPT).build_prompt(image_item, vlm) == VQA_PROMPT.format(
        question="何色ですか？"
    )
    with pytest.raises(VlmergeError, match="text-only"):
        vqa.build_prompt(image_item, text_bundle())
    with pytest.raises(VlmergeError, match="has no image"):
        Task("t", "d", "math_jsonl", prompt=VQA_PROMPT).build_prompt(text_item, text_bundle())
    assert Task("t", "d", "math_jsonl", prompt=MATH_PROMPT).build_prompt(text_item, text_bundle()) == (
        "Q: 1 + 1 は？\nA:"
    )


def test_chat_template_prompts():
    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    task = Task("t", "d", "math_jsonl", chat_template=True, system_prompt="日本語で答えて")
    item = Item("b", "1 + 1 は？", ("2",))
    expected = "[system] 日本語で答えて\n[user] 1 + 1 は？\n[assistant]"
    # a tokenizer that adds <s> itself gets the template's written <s> dropped; one that does not keeps it
    assert task.build_prompt(item, text_bundle(template, adds_bos=True)) == expected
    assert task.build_prompt(item, text_bundle(template)) == "<s>" + expected
    no_system = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    prompt = task.build_prompt(Item("b", "1 + 1 は？", ("2",)), text_bundle(no_system))
    assert prompt == "日本語で答えて\n\n1 + 1 は？"
    with pytest.raises(VlmergeError, match="no chat template"):
        task.build_prompt(Item("b", "q", ("2",)), text_bundle(None))


def test_llava_chat_template_gets_structured_content():
    template = (
        "{% for m in messages %}{{ m['role'] }}:{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    )
    tokenizer = build_tokenizer([IMAGE_TOKEN])
    processor = type("Processor", (), {"chat_template": template, "image_token": IMAGE_TOKEN})()
    from jinja2 import Template

    processor.apply_chat_template = lambda turns, **kw: Template(template).render(messages=turns)
    bundle = ModelBundle(
        model=None, processor=processor, tokenizer=tokenizer, family="llava", ref=ModelRef("x")
    )
    task = Task("t", "d", "vqa_jsonl", prompt=VQA_PROMPT, chat_template=True, system_prompt="sys")
    item = Item("a", "何色？", ("赤",), ImageRef(path=Path("x.png")))
    assert task.build_prompt(item, bundle) == "system:sys\nuser:<image>Q: 何色？\nA:\n"


def test_splits_roles_and_heldout_guard(tmp_path):
    data = vqa_dir(
        tmp_path / "d",
        {"search": [row(0)], "heldout": [row(1), row(2)]},
        images={"0.png": png(), "1.png": png(), "2.png": png()},
    )
    task = Task("t", str(data), "vqa_jsonl")
    assert [i.id for i in task.split("search")] == ["q0"]
    assert [i.id for i in task.split("heldout")] == ["q1", "q2"]
    guarded = Task("t", str(data), "vqa_jsonl", splits={"search": "heldout"})
    with pytest.raises(VlmergeError, match="allow_heldout_as_fitness"):
        guarded.split("search")
    allowed = Task("t", str(data), "vqa_jsonl", splits={"search": "heldout"}, allow_heldout_as_fitness=True)
    assert len(allowed.split("search")) == 2
    with pytest.raises(VlmergeError, match="no split 'dev'"):
        task.split("dev")


def test_bad_images_are_listed_or_skipped(tmp_path):
    rows = {"search": [row(0), row(1), row(2)]}
    data = vqa_dir(tmp_path / "d", rows, images={"0.png": png(), "1.png": b"not a png", "2.png": None})
    with pytest.raises(VlmergeError, match=r"2 item\(s\).*q1.*q2.*skip_bad_items"):
        Task("t", str(data), "vqa_jsonl").prepare("search")
    prepared = Task("t", str(data), "vqa_jsonl", skip_bad_items=True).prepare("search")
    assert prepared.bad_ids == {"q1", "q2"} and len(prepared.items) == 3


def test_data_problems_are_refused(tmp_path):
    escaping = vqa_dir(tmp_path / "esc", {"search": [row(0, image="../outside.png")]})
    with pytest.raises(VlmergeError, match="escapes the data folder"):
        Task("t", str(escaping), "vqa_jsonl").split("search")
    missing = vqa_dir(
        tmp_path / "miss", {"search": [{"id": "q0", "image": "images/0.png", "answers": ["a"]}]}
    )
    with pytest.raises(VlmergeError, match="missing field 'question'"):
        Task("t", str(missing), "vqa_jsonl").split("search")
    empty = vqa_dir(tmp_path / "empty", {"search": []})
    with pytest.raises(VlmergeError, match="no items"):
        Task("t", str(empty), "vqa_jsonl").split("search")
    with pytest.raises(VlmergeError, match="unknown dataset kind"):
        Task("t", str(empty), "vqa_csv").split("search")
    with pytest.raises(VlmergeError, match="no data"):
        Task("t", "???", "vqa_jsonl")
