"""Model families as data: where a family keeps its language tower.

Every tower tensor gets a *tower name*, the spelling of a plain causal LM (`model.embed_tokens.weight`,
`model.layers.{i}.self_attn.q_proj.weight`, `model.norm.weight`, `lm_head.weight`), whatever the checkpoint
calls it. A spec lists the prefix aliases that turn a family's on-disk (transformers 4 and 5) and in-memory
names into tower names; anything that matches no alias is not tower (vision encoder, projector,
`image_newline`) and is kept as the target has it. A new family is a few lines here, not a subclass.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from vlmerge.errors import VlmergeError

# checkpoint prefix -> tower prefix; the first matching alias wins
_CAUSAL_LM_ALIASES = (("model.", "model."), ("lm_head.", "lm_head."))
_LLAVA_ALIASES = (
    ("language_model.model.", "model."),  # on disk (transformers 4 and 5)
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),  # in memory (transformers >= 4.52, 5)
    ("lm_head.", "lm_head."),
)

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
FINAL_NORM = "model.norm.weight"
VOCAB_ROWS = (EMBED, HEAD)  # tensors whose dim 0 is the vocabulary

# module kinds by tower name; the first matching pattern wins (shared by every family)
MODULE_KINDS = (
    ("embedding", re.compile(r"^(model\.embed_tokens\.|lm_head\.)")),
    ("norm", re.compile(r"norm")),
    ("attention", re.compile(r"\.self_attn\.")),
    ("mlp", re.compile(r"\.(mlp|block_sparse_moe)\.")),
)
KINDS = tuple(kind for kind, _ in MODULE_KINDS) + ("other",)


@dataclass(frozen=True)
class TowerSpec:
    """Where a family's language tower lives in its checkpoint and config."""

    family: str
    architectures: tuple[str, ...]  # config.json `architectures` that select this family ("*" = any CausalLM)
    model_class: str  # transformers class (or vlmerge class) that loads the whole model
    depth_key: str  # dotted path of the tower depth in the tower's config.json
    vocab_key: str
    aliases: tuple[tuple[str, str], ...]
    subdir: str = ""  # folder of the tower's checkpoint inside the model dir
    is_vlm: bool = False

    def tower_name(self, checkpoint_name: str) -> str | None:
        """The tower name of a checkpoint/in-memory tensor name, None when it is not tower."""
        for prefix, tower_prefix in self.aliases:
            if checkpoint_name.startswith(prefix):
                return tower_prefix + checkpoint_name[len(prefix) :]
        return None

    def config_value(self, model_dir: Path, key: str) -> int:
        config = read_config(model_dir / self.subdir)
        value = config
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                raise VlmergeError(f"{model_dir / self.subdir / 'config.json'}: no `{key}` ({self.family} model)")
            value = value[part]
        return int(value)

    def depth(self, model_dir: Path) -> int:
        return self.config_value(model_dir, self.depth_key)


FAMILIES: dict[str, TowerSpec] = {
    spec.family: spec
    for spec in (
        TowerSpec(
            family="llava",
            architectures=("LlavaForConditionalGeneration",),
            model_class="LlavaForConditionalGeneration",
            depth_key="text_config.num_hidden_layers",
            vocab_key="text_config.vocab_size",
            aliases=_LLAVA_ALIASES,
            is_vlm=True,
        ),
        TowerSpec(
            family="llava_next",
            architectures=("LlavaNextForConditionalGeneration",),
            model_class="LlavaNextForConditionalGeneration",
            depth_key="text_config.num_hidden_layers",
            vocab_key="text_config.vocab_size",
            aliases=_LLAVA_ALIASES,
            is_vlm=True,
        ),
        TowerSpec(
            family="composite",
            architectures=(),
            model_class="vlmerge.models.composite.CompositeVLM",
            depth_key="num_hidden_layers",
            vocab_key="vocab_size",
            aliases=_CAUSAL_LM_ALIASES,
            subdir="language_model",
            is_vlm=True,
        ),
        TowerSpec(
            family="causal_lm",  # Mistral, Llama, Qwen2, ... : anything `*ForCausalLM` with model.layers
            architectures=("*",),
            model_class="AutoModelForCausalLM",
            depth_key="num_hidden_layers",
            vocab_key="vocab_size",
            aliases=_CAUSAL_LM_ALIASES,
        ),
    )
}
COMPOSITE_MARKER = "vlmerge_composite.json"


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise VlmergeError(f"missing config.json in {folder}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise VlmergeError(f"{path}: not valid JSON ({err})") from None


def detect_family(model_dir: Path) -> TowerSpec:
    """The family of a model folder, from its marker file or config.json `architectures`."""
    if (model_dir / COMPOSITE_MARKER).is_file():
        return FAMILIES["composite"]
    config = read_config(model_dir)
    architectures = config.get("architectures") or []
    for spec in FAMILIES.values():
        if any(arch in spec.architectures for arch in architectures):
            return spec
    if any(arch.endswith("ForCausalLM") for arch in architectures) and "text_config" not in config:
        return FAMILIES["causal_lm"]
    known = ", ".join(a for s in FAMILIES.values() for a in s.architectures if a != "*")
    raise VlmergeError(
        f"{model_dir}: unsupported model family (architectures={architectures}); supported: {known}, "
        f"any *ForCausalLM, and vlmerge composite VLMs ({COMPOSITE_MARKER})"
    )


def layer_of(tower_name: str) -> int | None:
    match = LAYER_RE.match(tower_name)
    return int(match.group(1)) if match else None


def with_layer(tower_name: str, layer: int) -> str:
    """The same tensor in another layer (for explicit layer maps)."""
    match = LAYER_RE.match(tower_name)
    if not match:
        return tower_name
    return f"model.layers.{layer}.{match.group(2)}"


def module_kind(tower_name: str) -> str:
    for kind, pattern in MODULE_KINDS:
        if pattern.search(tower_name):
            return kind
    return "other"
