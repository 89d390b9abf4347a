"""mergekit 0.1.5 YAML -> vlmerge recipe, with mergekit's meaning of every parameter (writer: mergekit_export.py).

mergekit resolves a parameter for one tensor of one model as: the model's own `parameters`, else the top-level
`parameters`, else the method default. A setting is a number, a gradient (a list of numbers) or a list of
`{filter, value}` entries where the first entry whose filter is a substring of the tensor name wins (no filter
or "*" matches all). A gradient [v_0 .. v_{m-1}] is read at t: k = int(t (m - 1)), f = t (m - 1) - k,
value = (1 - f) v_k + f v_{k+1}; layer i of n has t = i / (n - 1) (t = 1 when n = 1) and every non-layer
tensor (embeddings, final norm, lm_head) has t = 0, i.e. the first value (mergekit/plan.py). A list of one
value per layer therefore gives each layer its own value (up to one rounding of t (n - 1)).

Values are checked as they are read, naming the file, the key (`models[1].parameters.density[0].value[2]`) and
the layers that read a gradient entry: numbers finite and in the op's range (density in (0, 1], gamma in
[0, 1)); a gradient may have any length, as in mergekit (it is interpolated across the layers). Each rule keeps
where it was written, so a filter that names no tensor of the target tower is refused by that name when the pool
is known (`Recipe.check_selects`).

vlmerge rules are last-match, so `from_mergekit` emits the top-level settings first, then each model's, each
filter list in reverse order, a gradient as one rule for t = 0 plus one rule per run of equal layers.

Roles follow mergekit: task-arithmetic methods (ties, dare_*, breadcrumbs*) need `base_model` and never merge
it as an input (listing it changes nothing); linear merges every listed model plus `base_model` when given and
not listed; slerp needs `base_model` as its t = 0 end plus exactly one other model. The target is the one VLM
among the models when there is one, else the base for slerp, else the first input. DARE masks are drawn from
vlmerge's seeded generators, not mergekit's, so dare_* agree in distribution only.

mergekit-yaml options, for reference: --cuda = `device=cuda`; --out-shard-size counts bytes like
`max_shard_size`; --copy-tokenizer is what vlmerge always does (from the target, with every other non-weight
file); --lazy-unpickle has no counterpart (safetensors are read lazily; pickles need `allow_pickle=true`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping

from vlmerge.errors import VlmergeError
from vlmerge.merge.ops import OPS, get_op
from vlmerge.merge.recipe import SOURCE_PARAMS, Recipe, Rule, check_range
from vlmerge.models.source import ModelRef
from vlmerge.models.towers import detect_family

log = logging.getLogger(__name__)

TOP_KEYS = ("merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "tokenizer", "chat_template", "slices", "modules")  # fmt: skip
SWITCHES = ("normalize", "rescale", "lambda", "int8_mask")
PARAMS = (*SOURCE_PARAMS, "t", *SWITCHES)
KIND_FILTERS = ("self_attn", "mlp", "norm", "embed_tokens", "lm_head")

Value = float | tuple[float, ...]  # a scalar or a gradient
Conditions = list[tuple[str | None, Value, str]]  # (filter, value, where it is written), first match wins


def _float(raw, where: str) -> float:
    if isinstance(raw, str):  # YAML reads 1e-3 as a string; mergekit's pydantic takes it as a number
        try:
            raw = float(raw)
        except ValueError:
            pass
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise VlmergeError(f"{where} = {raw!r} is not a number")
    if not math.isfinite(raw):
        raise VlmergeError(f"{where} = {raw} is not finite")
    return float(raw)


def _value(raw, where: str, param: str, depth: int) -> Value:
    """A number or a gradient of `param`, its numbers checked to be in the op's range."""
    if isinstance(raw, list):
        if not raw:
            raise VlmergeError(f"{where}: an empty gradient list")
        value = tuple(_float(v, f"{where}[{i}]") for i, v in enumerate(raw))
        for i, v in enumerate(value):
            check_range(param, v, f"{where}[{i}]", f" (read by {_readers(i, len(value), depth)})")
        return value
    number = _float(raw, where)
    check_range(param, number, where)
    return number


def _readers(index: int, length: int, depth: int) -> str:
    """Which tensors read value `index` of a gradient (mergekit's interpolation; see the module docstring)."""
    layers = []
    for layer in range(depth):
        scaled = layer_t(layer, depth) * (length - 1)
        low = int(scaled)
        if index == low or (index == low + 1 and scaled > low):
            layers.append(layer)
    runs = []
    for layer in layers:
        if runs and runs[-1][1] == layer - 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    shown = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
    parts = ([f"layer{'s' if len(layers) > 1 else ''} {shown}"] if layers else []) + (
        ["the non-layer tensors"] if index == 0 else [])  # fmt: skip
    return " and ".join(parts) or "no tensor"


def _conditions(setting, where: str, param: str, depth: int) -> Conditions:
    """A mergekit setting as (filter, value, where) entries; a plain value is one entry without filter."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if not (isinstance(setting, list) and setting and all(isinstance(e, Mapping) for e in setting)):
        return [(None, _value(setting, where, param, depth), where)]
    out = []
    for i, entry in enumerate(setting):
        if "value" not in entry or set(entry) - {"value", "filter"}:
            raise VlmergeError(f"{where}[{i}]: want `value` and optionally `filter`: {dict(entry)}")
        flt = entry.get("filter")
        if flt is not None and (not isinstance(flt, str) or not flt):
            raise VlmergeError(f"{where}[{i}].filter = {flt!r}: give a substring of tensor names (or \"*\")")
        value = _value(entry["value"], f"{where}[{i}].value", param, depth)
        out.append((None if flt in (None, "*") else flt, value, f"{where}[{i}]"))
    return out


def value_at(value: Value, t: float) -> float:
    """mergekit's reading of a gradient at t (config.evaluate_setting), float for float."""
    if not isinstance(value, tuple):
        return value
    scaled = t * (len(value) - 1)
    i0 = int(scaled)
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return float((1 - frac) * value[i0] + frac * value[i1])


def layer_t(layer: int, depth: int) -> float:
    return layer / (depth - 1) if depth > 1 else 1.0


def _rules(conds: Conditions, param: str, source: str | None, depth: int, flip: bool) -> list[Rule]:
    """Rules giving `param` mergekit's value on every tensor a condition list selects (reverse: last wins)."""
    fix = (lambda v: 1.0 - v) if flip else (lambda v: v)
    rules = []
    for flt, value, where in reversed(conds):
        first = fix(value_at(value, 0.0))
        rules.append(Rule(values={param: first}, source=source, match=flt, origin=where))
        if isinstance(value, tuple):
            per_layer = [fix(value_at(value, layer_t(i, depth))) for i in range(depth)]
            start = 0
            for i in range(1, depth + 1):
                if i == depth or per_layer[i] != per_layer[start]:
                    if per_layer[start] != first:
                        rules.append(Rule(values={param: per_layer[start]}, source=source,
                                          layers=(start, i - 1), match=flt, origin=where))  # fmt: skip
                    start = i
    return rules


def _model(raw, where: str) -> tuple[str, str | None]:
    """A mergekit model reference ("path", "path@revision" or {model: ...}) as (path, revision)."""
    if isinstance(raw, Mapping):
        extra = {k for k, v in raw.items() if v is not None} - {"model", "path", "revision"}
        if extra:
            raise VlmergeError(f"{where}: {sorted(extra)} not supported (merge LoRAs into their model first)")
        inner = raw.get("model", raw)
        if isinstance(inner, Mapping):
            return str(inner["path"]), inner.get("revision")
        return _model(inner, where)
    if not isinstance(raw, str) or not raw or "+" in raw or raw.count("@") > 1:
        raise VlmergeError(f"{where} = {raw!r}: give a model folder or hub id (LoRA `+adapter`: unsupported)")
    path, _, revision = raw.partition("@")
    return path, revision or None


def _name(path: str, taken: set[str]) -> str:
    stem = re.sub(r"\W+", "_", path.rstrip("/").rsplit("/", 1)[-1]).strip("_") or "model"
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    taken.add(name)
    return name


def _ref(model: tuple[str, str | None]) -> str | dict:
    return model[0] if model[1] is None else {"path": model[0], "revision": model[1]}


def _params(raw, where: str, op: str, top: bool) -> dict:
    """The parameters of one setting level that the method reads (mergekit ignores the others: warned)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise VlmergeError(f"{where} must be a mapping of parameter names, got {raw!r}")
    unknown = set(raw) - set(PARAMS)
    if unknown:
        raise VlmergeError(f"{where}: unknown parameter(s) {sorted(unknown)}; known: {list(PARAMS)}")
    spec = get_op(op)
    read = set(spec.per_source)
    if top:  # shared parameters come from the top level only
        read |= {"lambda" if p == "lambda_" else p for p in spec.shared}
        read |= {"int8_mask"} if spec.needs_base else set()
    for key in sorted(set(raw) - read):
        log.warning("%s.%s is not read by %s here (mergekit ignores it too): dropped", where, key, op)
    return {k: v for k, v in raw.items() if k in read}


def _switch(raw: dict, key: str, where: str):
    if key not in raw:
        return None
    value = raw[key]
    if key == "lambda":
        if isinstance(value, (list, Mapping)):
            raise VlmergeError(f"{where}.lambda = {value!r}: vlmerge takes one lambda for all tensors")
        return _float(value, f"{where}.lambda")
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not isinstance(value, bool):
        raise VlmergeError(f"{where}.{key} = {value!r}: give true or false (one value for all tensors)")
    return value


def from_mergekit(raw: Mapping, where: str) -> tuple[Recipe, dict]:
    """A mergekit YAML (already parsed) as a vlmerge recipe and its pool (target, donors, base)."""
    unknown = set(raw) - set(TOP_KEYS)
    if unknown:
        raise VlmergeError(f"{where}: unknown mergekit key(s) {sorted(unknown)}; known: {list(TOP_KEYS)}")
    for key, why in (("slices", "give per-layer value lists instead of slices"),
                     ("modules", "only `models` configs are supported"),
                     ("tokenizer", "vlmerge keeps the target's tokenizer")):  # fmt: skip
        if raw.get(key) is not None:
            raise VlmergeError(f"{where}: `{key}` is not supported ({why})")
    method = raw.get("merge_method")
    try:
        op = get_op(method).name
    except VlmergeError:
        raise VlmergeError(f"{where}: merge_method {method!r} is not supported; supported: "
                           f"{', '.join(sorted(OPS))}") from None  # fmt: skip
    spec = get_op(op)
    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise VlmergeError(f"{where}: `models` must be a non-empty list of {{model, parameters}} entries")
    listed, model_params, model_where = [], {}, {}
    for i, entry in enumerate(entries):
        at = f"{where}.models[{i}]"
        if not isinstance(entry, Mapping) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise VlmergeError(f"{at}: expected a mapping with `model` and optional `parameters`: {entry!r}")
        model = _model(entry["model"], f"{at}.model")
        if model in listed:
            raise VlmergeError(f"{at}: {model[0]} is listed twice")
        listed.append(model)
        model_params[model] = _params(entry.get("parameters"), f"{at}.parameters", op, top=False)
        model_where[model] = f"{at}.parameters"
    base = _model(raw["base_model"], f"{where}.base_model") if raw.get("base_model") is not None else None
    if base is None and (spec.needs_base or op == "slerp"):
        raise VlmergeError(f"{where}: merge_method {op} needs `base_model`")
    if spec.needs_base:  # the base is never an input of a task-arithmetic method
        inputs = [m for m in listed if m != base]
    else:  # linear and slerp merge the base too when it is not listed
        inputs = listed + ([base] if base is not None and base not in listed else [])
    if not inputs:
        raise VlmergeError(f"{where}: no model to merge besides base_model")
    if op == "slerp" and len(inputs) != 2:
        raise VlmergeError(f"{where}: slerp merges base_model and one other model ({len(inputs)} inputs)")
    vlms = [m for m in dict.fromkeys([*inputs, *([base] if base else [])]) if _family(m).is_vlm]
    if len(vlms) > 1:
        raise VlmergeError(f"{where}: more than one VLM ({', '.join(m[0] for m in vlms)}); merge into one")
    target = vlms[0] if vlms else base if op == "slerp" else inputs[0]
    flip = op == "slerp" and target != base  # slerp from A to B at t = slerp from B to A at 1 - t
    zero_target = target not in inputs  # a VLM given as base_model: merged with weight 0 (its delta is 0)
    taken = {"target", "base"}
    names = {target: "target", **{m: _name(m[0], taken) for m in inputs if m != target}}
    depth = _family(target).depth(ModelRef(*target).resolve())

    top = _params(raw.get("parameters"), f"{where}.parameters", op, top=True)
    rules = []
    for param in spec.per_source:
        if param in top:
            conds = _conditions(top[param], f"{where}.parameters.{param}", param, depth)
            rules += _rules(conds, param, None, depth, False)
    for model, name in names.items():
        own = model_params.get(model, {})
        for param, setting in own.items():
            conds = _conditions(setting, f"{model_where[model]}.{param}", param, depth)
            rules += _rules(conds, param, name, depth, False)
        weightless = "weight" in spec.per_source and "weight" not in top and "weight" not in own
        if weightless and not (zero_target and name == "target"):
            raise VlmergeError(f"{where}: model {model[0]} has no `weight` (mergekit requires one; set it in "
                               "its parameters or in the top-level parameters)")  # fmt: skip
    if op == "slerp":
        if "t" not in top:
            raise VlmergeError(f"{where}: slerp needs `t` in the top-level parameters")
        rules += _rules(_conditions(top["t"], f"{where}.parameters.t", "t", depth), "t", None, depth, flip)
    if zero_target:
        rules.append(Rule(values={"weight": 0.0}, source="target"))
    if (raw.get("parameters") or {}).get("int8_mask"):
        log.warning("%s: int8_mask only changes mergekit's mask dtype; ignored", where)
    _check_tokenizer(raw, where, target, base)
    pool = {"target": _ref(target), "donors": {n: _ref(m) for m, n in names.items() if n != "target"}}
    if spec.needs_base and base != target:
        pool["base"] = _ref(base)
    lambda_ = _switch(top, "lambda", f"{where}.parameters")
    recipe = Recipe(op=op, sources=tuple(names.values()), rules=tuple(rules),
                    normalize=_switch(top, "normalize", f"{where}.parameters"),
                    rescale=_switch(top, "rescale", f"{where}.parameters"),
                    lambda_=1.0 if lambda_ is None else lambda_, pool=pool)  # fmt: skip
    return recipe, pool


def _family(model: tuple[str, str | None]):
    return detect_family(ModelRef(path=model[0], revision=model[1]).resolve())


def _check_tokenizer(raw: Mapping, where: str, target, base) -> None:
    source = raw.get("tokenizer_source")
    if source == "base":
        ok = base == target
    elif source is None or source == "union":
        ok = source is None
    else:
        try:
            ok = _model(source, f"{where}.tokenizer_source") == target
        except VlmergeError:
            ok = False
    if not ok:
        raise VlmergeError(f"{where}: tokenizer_source = {source!r} is not supported: vlmerge keeps the "
                           f"target's tokenizer ({target[0]}) and merges the vocabulary rows all models "
                           "share; remove tokenizer_source or set it to the target")  # fmt: skip
    for key in ("dtype", "out_dtype"):
        if raw.get(key) not in (None, "float32"):
            log.warning("%s: %s = %s: vlmerge-merge computes in compute_dtype (float32) and writes the "
                        "target's dtype unless out_dtype=... is given", where, key, raw[key])  # fmt: skip
    if raw.get("chat_template") is not None:
        log.warning("%s: chat_template ignored: the target's chat template is kept", where)
