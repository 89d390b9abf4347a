"""A task: which data, how to prompt, generate, read the answer and score it. One for VQA and math alike.

Built from `conf/task/NAME.yaml` (`_target_: vlmerge.eval.task.Task` and these arguments). The dataset is
loaded once, on first use, and each split's images are checked once; nothing about a model is kept, so one
task object serves every candidate of a search.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from vlmerge.errors import VlmergeError
from vlmerge.eval.data import DataNotFound, Dataset, Item, load_dataset, resolve_split, screen_images
from vlmerge.eval.generate import GenerationSettings, cut_at_stop
from vlmerge.eval.loading import IMAGE_PLACEHOLDER, ModelBundle
from vlmerge.eval.metrics import METRICS, MetricResult, get_metric
from vlmerge.user_input import string_list

log = logging.getLogger(__name__)

PROMPT_FIELDS = ("question",)


@dataclass(frozen=True)
class PreparedSplit:
    """A split's items and the ids of those whose image cannot be read (scored as empty predictions)."""

    name: str
    items: tuple[Item, ...]
    bad_ids: frozenset[str]


class NoTaskData(VlmergeError):
    """A task built without data. The constructor does not know the config key it was built from (instantiate_task
    sets `config_key` on the built task), so instantiate_task raises it again naming the key to set."""

    def __init__(self, name: str, config_key: str = "task"):
        super().__init__(f"task {name!r}: no data given; set {config_key}.data=<hub id or local path>")
        self.name = name


class Task:
    """Data + prompt + generation settings + answer post-processing + metric, with the fitness key."""

    config_key = "task"  # the config node it was built from, for messages (instantiate_task sets it)

    def __init__(
        self,
        name: str,
        data: str,
        loader: str,
        revision: str | None = None,
        splits: Mapping[str, str | None] | None = None,
        loader_options: Mapping[str, Any] | None = None,
        limit: int | None = None,
        prompt: str = "{question}",
        chat_template: bool = False,
        system_prompt: str | None = None,
        max_new_tokens: int = 64,
        num_beams: int = 1,
        repetition_penalty: float = 1.0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: Sequence[str] = (),
        batch_size: int = 8,
        strip: bool = True,
        first_line: bool = False,
        metric: str = "rouge_ja",
        metric_kwargs: Mapping[str, Any] | None = None,
        fitness_key: str | None = None,
        skip_bad_items: bool = False,
        allow_heldout_as_fitness: bool = False,
    ):
        if not name or not isinstance(name, str):
            raise VlmergeError(f"task name must be a non-empty string, got {name!r}")
        if data is None or str(data) in ("", "???"):
            raise NoTaskData(name)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise VlmergeError(f"task {name!r}: limit must be a positive integer or null, got {limit!r}")
        self.name = name
        self.data = str(data)
        self.loader = loader
        self.revision = revision
        self.splits = dict(splits) if splits is not None else None
        self.loader_options = dict(loader_options or {})
        self.limit = limit
        self.prompt = _checked_prompt(name, prompt)
        self.chat_template = bool(chat_template)
        self.system_prompt = system_prompt
        self.generation = _settings(
            name,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            repetition_penalty=repetition_penalty,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=tuple(string_list(stop, f"task {name!r}: stop", "task.stop='[\"STRING\", ...]'")),
            batch_size=batch_size,
        )
        self.strip = bool(strip)
        self.first_line = bool(first_line)
        if metric not in METRICS:
            raise VlmergeError(
                f"task {name!r}: unknown metric {metric!r}; known metrics: {', '.join(sorted(METRICS))}"
            )
        self.metric_name = metric
        self.metric_kwargs = dict(metric_kwargs or {})
        self.metric = get_metric(metric, **self.metric_kwargs)
        self.fitness_key = fitness_key or getattr(self.metric, "primary", None)
        if not self.fitness_key:
            raise VlmergeError(f"task {name!r}: metric {metric!r} names no primary value; set fitness_key")
        self.skip_bad_items = bool(skip_bad_items)
        self.allow_heldout_as_fitness = bool(allow_heldout_as_fitness)
        self._prepared: dict[str, PreparedSplit] = {}
        self._fitness_key_checked = False

    def __repr__(self) -> str:
        return f"Task({self.name!r}, data={self.data!r}, loader={self.loader!r}, metric={self.metric_name!r})"

    # ------------------------------------------------------------------ data

    @cached_property
    def dataset(self) -> Dataset:
        try:
            return load_dataset(
                self.loader,
                self.data,
                revision=self.revision,
                splits=self.splits,
                limit=self.limit,
                options=self.loader_options,
            )
        except DataNotFound as error:
            raise VlmergeError(f"{self.config_key}.data: {error}") from None

    def split_name(self, split: str) -> str:
        """Split name for "search" (fitness: never the held-out split unless allowed), "heldout" or a name."""
        return resolve_split(self.dataset, split, allow_heldout_as_fitness=self.allow_heldout_as_fitness)

    def prepare(self, split: str) -> PreparedSplit:
        """The split's items, images checked once (bad ones refused, or set aside with skip_bad_items)."""
        name = self.split_name(split)
        if name not in self._prepared:
            items = tuple(self.dataset.split(name))  # loaders refuse empty splits
            bad = screen_images(items, skip_bad_items=self.skip_bad_items, what=f"{self.data} split {name!r}")
            self._prepared[name] = PreparedSplit(name, items, bad)
        return self._prepared[name]

    def split(self, split: str) -> list[Item]:
        return list(self.prepare(split).items)

    # ------------------------------------------------------------------ prompts and answers

    def build_prompt(self, item: Item, bundle: ModelBundle) -> str:
        """The model input text of one item: the template filled in, the image token placed, chat-wrapped."""
        text = self.prompt.format(question=item.question)
        has_image = item.image is not None
        if has_image and not bundle.is_vlm:
            raise VlmergeError(
                f"task {self.name!r} has images (item {item.id!r}) but {bundle.ref.path} is a text-only "
                f"{bundle.family} model"
            )
        if not has_image and IMAGE_PLACEHOLDER in text:
            raise VlmergeError(
                f"task {self.name!r}: the prompt has {IMAGE_PLACEHOLDER} but item {item.id!r} has no image; "
                "remove it from the prompt of a text task"
            )
        if has_image and IMAGE_PLACEHOLDER not in text:
            text = f"{IMAGE_PLACEHOLDER}\n{text}"
        if self.chat_template:
            text = bundle.chat_prompt(text, system=self.system_prompt, has_image=has_image)
        if has_image:
            text = text.replace(IMAGE_PLACEHOLDER, bundle.image_token)
        return text

    def postprocess(self, output: str) -> str:
        """The answer in a raw generation: cut at the first stop string, first line, stripped (as configured).

        Idempotent, so applying it to predictions made elsewhere (or by us) changes nothing twice.
        """
        text = cut_at_stop(output, self.generation.stop)
        if self.first_line:
            text = text.strip().split("\n", 1)[0]
        return text.strip() if self.strip else text

    # ------------------------------------------------------------------ scoring

    def score(self, predictions: Sequence[str], items: Sequence[Item]) -> MetricResult:
        result = self.metric(list(predictions), [list(item.answers) for item in items])
        self._check_fitness_key(result.values)
        return result

    def check_fitness_key(self) -> None:
        """Refuse a fitness key the metric does not produce before generating anything (one-item probe)."""
        if not self._fitness_key_checked:
            self._check_fitness_key(self.metric(["1"], [["1"]]).values)
            self._fitness_key_checked = True

    def _check_fitness_key(self, values: Mapping[str, float]) -> None:
        if self.fitness_key not in values:
            raise VlmergeError(
                f"task {self.name!r}: fitness_key {self.fitness_key!r} is not a value of metric "
                f"{self.metric_name!r}; its values are {sorted(values)}"
            )

    def close(self) -> None:
        """Release the metric's helpers (the METEOR Java process of coco_captions)."""
        close = getattr(self.metric, "close", None)
        if close is not None:
            close()

    def describe(self) -> dict:
        """The settings a report records next to the scores."""
        return {
            "name": self.name,
            "data": self.data,
            "loader": self.loader,
            "revision": self.revision,
            "loader_options": self.loader_options,
            "limit": self.limit,
            "prompt": self.prompt,
            "chat_template": self.chat_template,
            "system_prompt": self.system_prompt,
            "generation": self.generation.to_dict(),
            "strip": self.strip,
            "first_line": self.first_line,
            "metric": self.metric_name,
            "metric_kwargs": self.metric_kwargs,
            "fitness_key": self.fitness_key,
        }


def instantiate_task(node: Mapping[str, Any], key: str = "task") -> Task:
    """A task from its config node at `key` (`_target_` + arguments), with config mistakes as one VlmergeError;
    data that is not given or not found is refused naming `key`.data (the task's `config_key`)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        task = instantiate(node, _convert_="all")
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, NoTaskData):
            raise NoTaskData(cause.name, config_key=key) from None
        if isinstance(cause, VlmergeError):
            raise cause from None
        raise VlmergeError(f"task config: {cause or error}") from None
    if not isinstance(task, Task):
        raise VlmergeError(
            f"task config: _target_ must build a vlmerge.eval.task.Task, got {type(task).__name__}"
        )
    task.config_key = key
    return task


def _checked_prompt(task: str, prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt:
        raise VlmergeError(f"task {task!r}: prompt must be a non-empty format string, got {prompt!r}")
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(prompt) if field is not None]
    except ValueError as error:
        raise VlmergeError(
            f"task {task!r}: prompt is not a valid format string ({error}); "
            "write literal braces as {{ and }}"
        ) from None
    unknown = sorted(set(fields) - set(PROMPT_FIELDS))
    if unknown:
        raise VlmergeError(
            f"task {task!r}: prompt uses unknown field(s) {unknown}; it may use {{question}} only "
            "(literal braces are written {{ and }})"
        )
    return prompt


def _settings(task: str, **values) -> GenerationSettings:
    try:
        return GenerationSettings(**values)
    except VlmergeError as error:
        raise VlmergeError(f"task {task!r}: {error}") from None
