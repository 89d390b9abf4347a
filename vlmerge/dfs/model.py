"""The path model: a loaded model whose decoder stack runs a LayerPath through its own layers and a donor's.

Nothing is copied per candidate. `apply(path)` puts a new `layers` list into the loaded model's decoder stack,
made of *views*: shallow copies of the resident layer modules (they share the parameter dicts) that differ
only in `layer_idx` (each path position has its own KV-cache slot) and, where a scaling applies, in a small
wrapper. The stack's config gets the path's depth (and `layer_types`), so the model's own forward, masks,
cache and `generate` run unchanged, for causal LMs, LLaVA, LLaVA-NeXT and the composite VLM alike (the vision
encoder and projector are A's). `reset()` puts tower A back. Build a ResidentMerger (PS + DFS) before a path
is installed: parameter names are read from the model as it is at that time.

Scalings, two equivalent forms (`fold`):
- `fold=True` (default): the state is kept divided by the cumulative scale C_k and the layer at position k
  has its output projections (attention o_proj, MLP down_proj) multiplied by 1/C_k. This is exactly the
  exported model (vlmerge.dfs.export), so what the search scores is what it exports. It needs pre-norm
  RMSNorm layers (FOLDABLE); it equals the paper's literal form up to RMSNorm's eps, which a scaled input
  sees as eps / C_k^2.
- `fold=False`: the paper's literal form, the hidden state entering position k is multiplied by its
  scaling. Works for any family with a `layers` stack; such a path cannot be exported exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from vlmerge.dfs.path import LayerPath
from vlmerge.errors import VlmergeError
from vlmerge.models.pool import Tower, open_tower
from vlmerge.models.source import ModelRef, as_ref

# model_type -> output projections a cumulative scale folds into (pre-norm RMSNorm layers; tests/dfs checks)
FOLDABLE: dict[str, tuple[str, ...]] = {
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
}
# config keys that fix what a layer's weights compute: A and B must agree on them
LAYER_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
              "hidden_act", "rms_norm_eps", "rope_parameters", "attention_bias", "mlp_bias")  # fmt: skip


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module that holds the language tower's `layers`, `embed_tokens` and final `norm`."""
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(getattr(m, "layers", None), nn.ModuleList) and hasattr(m, "embed_tokens")
             and hasattr(m, "norm")]  # fmt: skip
    if len(found) != 1:
        names = [name or "<root>" for name, _ in found]
        raise VlmergeError(
            f"{type(model).__name__}: expected one decoder stack (a module with layers, "
            f"embed_tokens and norm), found {len(found)} {names}"
        )
    return found[0][1]


def check_foldable(config, layer: nn.Module) -> tuple[str, ...]:
    """The fold targets of a family, or a refusal naming it."""
    targets = FOLDABLE.get(config.model_type)
    if targets is None:
        raise VlmergeError(
            f"model type {config.model_type!r} ({type(layer).__name__}) is not a known pre-norm RMSNorm "
            "family: a hidden-state scaling cannot be folded into its weights exactly "
            f"(foldable: {sorted(FOLDABLE)}). "
            "Use unit scalings (merge.path.scaling=none); a PathModel with fold=false scores such a path, but it "
            "cannot be exported."
        )
    modules = dict(layer.named_modules())
    missing = [t for t in (*targets, "input_layernorm", "post_attention_layernorm") if t not in modules]
    if missing:
        raise VlmergeError(
            f"{type(layer).__name__} ({config.model_type}) has no {missing}: cannot fold into it"
        )
    return targets


def check_compatible(config_a, config_b, where_a: str, where_b: str) -> None:
    """Refuse towers whose layers compute different things (hidden size, heads, MLP, norm eps, RoPE)."""

    def value(config, key):
        if key == "head_dim":
            return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if key in ("attention_bias", "mlp_bias"):
            return bool(getattr(config, key, False))
        return getattr(config, key, None)

    differ = [f"{k} (A {value(config_a, k)!r}, B {value(config_b, k)!r})" for k in LAYER_KEYS
              if value(config_a, k) != value(config_b, k)]  # fmt: skip
    if differ:
        raise VlmergeError(f"towers A ({where_a}) and B ({where_b}) are incompatible: {'; '.join(differ)}")
    if getattr(config_a, "is_heterogeneous", False) or getattr(config_b, "is_heterogeneous", False):
        raise VlmergeError(
            f"towers with per-layer configs (per_layer_config) are not supported ({where_a}, {where_b})"
        )


def load_donor_layers(stack: nn.Module, donor: Tower) -> tuple[nn.ModuleList, list[str] | None]:
    """B's decoder layers as modules of A's layer class, on A's device and dtype; and their layer types."""
    config_b = AutoConfig.from_pretrained(donor.tower_folder).get_text_config(decoder=True)
    check_compatible(stack.config, config_b, str(_source(stack)), str(donor.folder))
    layer_a = stack.layers[0]
    template = next(layer_a.parameters())
    config = copy.deepcopy(stack.config)
    config.num_hidden_layers = donor.depth
    types_b = None
    if getattr(stack.config, "layer_types", None) is not None:
        types_b = list(getattr(config_b, "layer_types", None) or ["full_attention"] * donor.depth)
        config.layer_types = types_b
    layers = []
    for j in range(donor.depth):
        with torch.device("meta"):
            layer = type(layer_a)(config, j)
        layer = layer.to_empty(device=template.device).to(template.dtype)
        expected = layer.state_dict()
        prefix = f"model.layers.{j}."
        have = {n[len(prefix) :]: n for n in donor.names if n.startswith(prefix)}
        missing, unexpected = sorted(set(expected) - set(have)), sorted(set(have) - set(expected))
        if missing or unexpected:
            raise VlmergeError(
                f"donor {donor.folder} layer {j}: missing tensors {missing[:5]}, unexpected "
                f"{unexpected[:5]} for A's {type(layer_a).__name__}"
            )
        state = {}
        for rel, tower_name in have.items():
            tensor = donor.checkpoint.get(donor.names[tower_name])
            if tuple(tensor.shape) != tuple(expected[rel].shape):
                raise VlmergeError(
                    f"donor {donor.folder}: tensor {donor.names[tower_name]} has shape "
                    f"{tuple(tensor.shape)}; A's layers need {tuple(expected[rel].shape)}"
                )
            state[rel] = tensor
        layer.load_state_dict(state, strict=True)
        _point_config(layer, config, stack.config)
        layers.append(layer.eval())
    return nn.ModuleList(layers), types_b


def _source(stack: nn.Module) -> str:
    return getattr(stack.config, "_name_or_path", "") or type(stack).__name__


def _point_config(layer: nn.Module, old, new) -> None:
    """Donor submodules read A's live config at run time (attention implementation), not the build copy."""
    for module in layer.modules():
        if getattr(module, "config", None) is old:
            module.config = new


class _ScaledOutput(nn.Module):
    """An output projection times a constant: the fold applied to activations instead of weights."""

    def __init__(self, inner: nn.Module, factor: float):
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.factor


class _ScaledInput(nn.Module):
    """A decoder layer fed its hidden state times a constant (the paper's literal scaling)."""

    def __init__(self, layer: nn.Module, scale: float):
        super().__init__()
        self.layer, self.scale = layer, scale

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self.layer(hidden_states * self.scale, *args, **kwargs)


def _view(module: nn.Module, edits: dict[str, list[Callable[[nn.Module], nn.Module]]]) -> nn.Module:
    """A shallow copy of `module` with the edits applied at dotted submodule names ("" = the module)."""
    out = copy.copy(module)
    nested: dict[str, dict[str, list]] = {}
    for name, fns in edits.items():
        if name:
            head, _, rest = name.partition(".")
            nested.setdefault(head, {}).setdefault(rest, []).extend(fns)
    if nested:
        out._modules = dict(module._modules)
        for head, sub in nested.items():
            out._modules[head] = _view(module._modules[head], sub)
    for fn in edits.get("", []):
        out = fn(out)
    return out


def _set_layer_idx(position: int) -> Callable[[nn.Module], nn.Module]:
    def edit(module: nn.Module) -> nn.Module:
        module.layer_idx = position  # a plain attribute: lands in the copy's own __dict__
        return module

    return edit


def _layer_idx_holders(layer: nn.Module) -> tuple[str, ...]:
    """The submodules that address the KV cache by `layer_idx` (each path position needs its own slot)."""
    names = tuple(n for n, m in layer.named_modules() if isinstance(getattr(m, "layer_idx", None), int))
    if not names:
        raise VlmergeError(
            f"{type(layer).__name__} has no `layer_idx`: its KV-cache slots cannot follow a path"
        )
    return names


class PathModel:
    """Runs LayerPaths on a loaded model (tower A) and a donor's layers (tower B), resident once."""

    def __init__(self, model: nn.Module, donor: Tower | ModelRef | str | Path, *, fold: bool = True):
        """`model`: the loaded target (causal LM, LLaVA, LLaVA-NeXT or composite VLM), on its final device
        and dtype. `donor`: a pool Tower or a model folder/ref whose language-tower layers become tower B."""
        self.model = model
        self.stack = decoder_stack(model)
        self.config = self.stack.config
        self.fold = fold
        self.layers_a = list(self.stack.layers[: self.config.num_hidden_layers])
        self.fold_targets = check_foldable(self.config, self.layers_a[0]) if fold else ()
        self.donor = donor if isinstance(donor, Tower) else open_tower("donor", as_ref(_ref(donor)))
        self.layers_b, self.types_b = load_donor_layers(self.stack, self.donor)
        self.idx_holders = _layer_idx_holders(self.layers_a[0])
        self.types_a = getattr(self.config, "layer_types", None)
        self._original = (self.stack.layers, self.config.num_hidden_layers, self.types_a,
                          getattr(self.stack, "has_sliding_layers", None))  # fmt: skip
        self.path: LayerPath | None = None

    @property
    def depth_a(self) -> int:
        return len(self.layers_a)

    @property
    def depth_b(self) -> int:
        return len(self.layers_b)

    def source_layer(self, tower: str, index: int) -> nn.Module:
        return self.layers_a[index] if tower == "A" else self.layers_b[index]

    def layer_types(self, path: LayerPath) -> list[str] | None:
        """The config's `layer_types` for the path's stack (None when the family has none)."""
        if self.types_a is None:
            return None
        return [self.types_a[i] if t == "A" else self.types_b[i] for t, i in path.steps()]

    def check(self, path: LayerPath) -> None:
        if (path.depth_a, path.depth_b) != (self.depth_a, self.depth_b):
            raise VlmergeError(
                f"path is for towers of {path.depth_a} + {path.depth_b} layers; this model has "
                f"{self.depth_a} (A) + {self.depth_b} (B)"
            )

    def apply(self, path: LayerPath) -> None:
        """Install `path` into the model (until the next apply or reset)."""
        self.check(path)
        views = []
        for k, ((tower, index), cumulative) in enumerate(zip(path.steps(), path.cumulative(), strict=True)):
            edits: dict[str, list] = {name: [_set_layer_idx(k)] for name in self.idx_holders}
            if self.fold and cumulative != 1.0:
                for target in self.fold_targets:
                    edits.setdefault(target, []).append(lambda m, f=1.0 / cumulative: _ScaledOutput(m, f))
            view = _view(self.source_layer(tower, index), edits)
            scale = path.scales[k - 1] if k else 1.0
            views.append(_ScaledInput(view, scale) if not self.fold and scale != 1.0 else view)
        types = self.layer_types(path)
        self.stack.layers = nn.ModuleList(views)
        if types is not None:
            self.config.layer_types = types
            if self._original[3] is not None:
                self.stack.has_sliding_layers = "sliding_attention" in types
        self.config.num_hidden_layers = len(views)
        self.path = path

    def reset(self) -> None:
        """Put tower A back exactly as it was loaded."""
        layers, depth, types, sliding = self._original
        self.stack.layers = layers
        if types is not None:
            self.config.layer_types = types
        if sliding is not None:
            self.stack.has_sliding_layers = sliding
        self.config.num_hidden_layers = depth
        self.path = None

    @contextmanager
    def installed(self, path: LayerPath) -> Iterator[nn.Module]:
        """`with pm.installed(path) as model: model(...)`; tower A is back afterwards, also on error."""
        self.apply(path)
        try:
            yield self.model
        finally:
            self.reset()


def _ref(donor) -> ModelRef | str:
    return str(donor) if isinstance(donor, Path) else donor
