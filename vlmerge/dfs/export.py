"""Export a LayerPath as an ordinary model: the target's architecture with a longer layer stack.

Position k of the path becomes layer k of the exported tower: a copy of its source layer (A's or B's) whose
output projections (attention o_proj, MLP down_proj; weight and bias) are divided by the cumulative scale C_k.
Why that is the scaled path: in a pre-norm layer, x + f(norm(x)), fed C * x, equals C * (x + f(norm(x)) / C)
up to RMSNorm's eps (which a scaled input sees as eps / C^2), and f's last op is the output projection. So
the exported model keeps the state divided by C_k, and the final norm, being scale invariant, hides the last
C. This is exactly what PathModel(fold=True) runs. Families that are not pre-norm RMSNorm (FOLDABLE) are
refused unless every cumulative scale is 1 (nothing to fold).

The tower config's depth (`text_config.num_hidden_layers` for LLaVA) and its `layer_types` follow the path;
another per-layer list in the config is refused rather than guessed. Embeddings, final norm and head are the
loaded model's (so a PS merge held in memory is what is written); vision encoder, projector, tokenizer and
processor files are copied from the target folder. Written into a temp folder, renamed at the end.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from vlmerge import __version__
from vlmerge.dfs.model import PathModel, check_foldable
from vlmerge.dfs.path import LayerPath
from vlmerge.errors import VlmergeError
from vlmerge.models.export import _copy_non_weights, check_output_dir, parse_size, staged_dir
from vlmerge.models.pool import Tower, open_tower
from vlmerge.models.source import ModelRef, as_ref
from vlmerge.models.towers import layer_of

PATH_FILE = "vlmerge_dfs_path.yaml"
NOT_PER_LAYER = ("layer_types", "architectures", "eos_token_id")  # lists that may happen to have depth items


@dataclass(frozen=True)
class _Entry:
    key: str
    nbytes: int
    make: Callable[[], torch.Tensor]


def export_path(path_model: PathModel, path: LayerPath, output_dir: Path | str, *,
                target: Tower | ModelRef | str | Path, overwrite: bool = False,
                max_shard_size: int | str = "2GB", out_dtype: torch.dtype | None = None) -> Path:  # fmt: skip
    """Write `path` (run by `path_model`, tower A loaded from `target`) as an ordinary model folder."""
    path_model.check(path)
    cumulative = path.cumulative()
    targets = (
        () if all(c == 1.0 for c in cumulative) else check_foldable(path_model.config, path_model.layers_a[0])
    )
    tower = target if isinstance(target, Tower) else open_tower("target", as_ref(_ref(target)))
    if tower.depth != path_model.depth_a:
        raise VlmergeError(
            f"target {tower.folder} has {tower.depth} layers; the path model's tower A has "
            f"{path_model.depth_a}: pass the folder the model was loaded from"
        )
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    entries = _entries(path_model, path, tower, targets, out_dtype)
    config = _path_config(tower, path_model, path)
    with staged_dir(output_dir, overwrite) as tmp:
        _copy_non_weights(tower.folder, tmp, tower.spec.subdir)
        (tmp / tower.spec.subdir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_shards(tmp / tower.spec.subdir, entries, parse_size(max_shard_size))
        record = {"path": path.to_dict(), "donor": str(path_model.donor.folder), "target": str(tower.folder)}
        (tmp / PATH_FILE).write_text(yaml.safe_dump(record, sort_keys=False))
        (tmp / "README.md").write_text(_card(path, tower, path_model))
    return output_dir


def _ref(value) -> ModelRef | str:
    return str(value) if isinstance(value, Path) else value


def _resident_outer(path_model: PathModel, tower: Tower) -> dict[str, torch.Tensor]:
    """The loaded model's non-layer tower tensors (embeddings, final norm, head) by tower name."""
    root = getattr(path_model.model, tower.spec.subdir) if tower.spec.subdir else path_model.model
    out = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        tower_name = tower.spec.tower_name(name)
        if tower_name is not None and layer_of(tower_name) is None:
            out[tower_name] = param.detach()
    return out


def _entries(path_model: PathModel, path: LayerPath, tower: Tower, targets: tuple[str, ...],
             out_dtype: torch.dtype | None) -> list[_Entry]:  # fmt: skip
    """The exported checkpoint's tensors in the target's order; the layer block replaces A's layers."""
    checkpoint = tower.checkpoint
    first = sorted(n for n in tower.names if layer_of(n) == 0)
    rels = [n[len("model.layers.0.") :] for n in first]
    suffix = first[0][len("model.") :]
    if not tower.names[first[0]].endswith(suffix):
        raise VlmergeError(f"{tower.folder}: checkpoint key {tower.names[first[0]]} does not end in {suffix}")
    prefix = tower.names[first[0]][: -len(suffix)]  # e.g. "language_model.model."
    outer = _resident_outer(path_model, tower)
    key_to_tower = {key: name for name, key in tower.names.items()}
    entries, block_done = [], False
    for key in checkpoint.names:
        name = key_to_tower.get(key)
        if name is None:
            entries.append(_Entry(key, checkpoint.nbytes(key), lambda k=key: checkpoint.get(k)))
        elif layer_of(name) is None:
            if name not in outer:
                raise VlmergeError(f"the loaded model has no parameter for {key} of {tower.folder}")
            dtype = out_dtype or checkpoint.dtype(key)
            tensor = outer[name]
            if tuple(tensor.shape) != checkpoint.shape(key):
                raise VlmergeError(
                    f"{key}: the loaded model has shape {tuple(tensor.shape)}, {tower.folder} "
                    f"{checkpoint.shape(key)}; pass the folder the model was loaded from"
                )
            entries.append(
                _Entry(key, tensor.numel() * dtype.itemsize, lambda t=tensor, d=dtype: t.to("cpu", d))
            )
        elif not block_done:
            block_done = True
            dtypes = {
                rel: out_dtype or checkpoint.dtype(tower.names[f"model.layers.0.{rel}"]) for rel in rels
            }
            entries += _layer_block(path_model, path, prefix, rels, dtypes, targets)
    return entries


def _layer_block(path_model: PathModel, path: LayerPath, prefix: str, rels: list[str],
                 dtypes: dict[str, torch.dtype], targets: tuple[str, ...]) -> list[_Entry]:  # fmt: skip
    entries = []
    for k, ((tower_id, index), scale) in enumerate(zip(path.steps(), path.cumulative(), strict=True)):
        state = path_model.source_layer(tower_id, index).state_dict()
        if set(state) != set(rels):
            odd = sorted(set(state) ^ set(rels))
            raise VlmergeError(
                f"layer {path.name(path.layers[k])} has tensors that A's checkpoint layers do not "
                f"(or lacks some): {odd[:5]}"
            )
        for rel in rels:
            key = f"{prefix}layers.{k}.{rel}"
            divide = scale if rel.rsplit(".", 1)[0] in targets else 1.0
            make = lambda t=state[rel], c=divide, d=dtypes[rel], key=key: _folded(t, c, d, key)  # noqa: E731
            entries.append(_Entry(key, state[rel].numel() * dtypes[rel].itemsize, make))
    return entries


def _folded(tensor: torch.Tensor, divide: float, dtype: torch.dtype, key: str) -> torch.Tensor:
    if divide == 1.0:  # a copy: a layer used at several positions must not share storage in a shard
        return tensor.detach().to("cpu", dtype, copy=True)
    out = (tensor.detach().to("cpu", torch.float32) / divide).to(dtype)
    if not torch.isfinite(out).all():
        raise VlmergeError(
            f"{key}: dividing by the cumulative scale {divide:.4g} leaves values outside {dtype}; "
            "narrow merge.path's scale range or export in a wider out_dtype"
        )
    return out


def _path_config(tower: Tower, path_model: PathModel, path: LayerPath) -> dict:
    """The tower's config.json with the path's depth and layer types; other per-layer lists are refused."""
    data = json.loads((tower.tower_folder / "config.json").read_text())
    *parents, depth_key = tower.spec.depth_key.split(".")
    node = data
    for part in parents:
        node = node[part]
    lists = [
        k for k, v in node.items() if isinstance(v, list) and len(v) == tower.depth and k not in NOT_PER_LAYER
    ]
    if lists:
        raise VlmergeError(
            f"{tower.tower_folder / 'config.json'}: per-layer list(s) {lists} would have to grow "
            "with the layer stack; vlmerge does not know how for this family"
        )
    node[depth_key] = len(path.layers)
    types = path_model.layer_types(path)
    if types is not None:
        node["layer_types"] = types
    return data


def _write_shards(folder: Path, entries: list[_Entry], max_shard: int) -> None:
    """Sharded safetensors + index, one shard in memory at a time."""
    shards: list[list[_Entry]] = [[]]
    filled = 0
    for entry in entries:
        if shards[-1] and filled + entry.nbytes > max_shard:
            shards.append([])
            filled = 0
        shards[-1].append(entry)
        filled += entry.nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        batch = {entry.key: entry.make().contiguous() for entry in shard}
        save_file(batch, str(folder / file), metadata={"format": "pt"})
        for key, tensor in batch.items():
            weight_map[key] = file
            total += tensor.numel() * tensor.element_size()
        del batch
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _card(path: LayerPath, tower: Tower, path_model: PathModel) -> str:
    kept = "vision encoder and projector copied unchanged from A; " if tower.spec.is_vlm else ""
    return (
        "---\nlibrary_name: transformers\ntags: [vlmerge, merge, dfs]\n---\n"
        f"# DFS merge, vlmerge {__version__}\n\n"
        f"A data-flow-space merge exported as an ordinary `{tower.spec.model_class}` with {len(path.layers)} "
        f"language-tower layers (loads without trust_remote_code). Embeddings, final norm and head from A; "
        f"{kept}tokenizer and configs from A. Each layer is a copy of the path's layer with its output "
        "projections divided by the cumulative hidden-state scale.\n\n"
        f"## Towers\n- **A** (target): `{tower.ref.path}` ({tower.spec.family}, {path.depth_a} layers)\n"
        f"- **B** (donor): `{path_model.donor.ref.path}` ({path_model.donor.spec.family}, "
        f"{path.depth_b} layers)\n\n"
        f"## Path\n`{path.describe()}`\n\n```yaml\n{yaml.safe_dump(path.to_dict(), sort_keys=False)}```\n"
    )
