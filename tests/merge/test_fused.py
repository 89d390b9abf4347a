"""The one-pass merge (merge.fused) against the reference ops, its CPU code against the GPU kernel (Triton's
interpreter on CPU; the compiled kernel where CUDA is present), DARE hash masks, and the resident merger."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmerge.errors import VlmergeError
from vlmerge.merge import fused
from vlmerge.merge.merger import TensorInputs, merge_tensor
from vlmerge.merge.ops import OPS, OpArgs, get_op
from vlmerge.merge.recipe import Recipe, Rule
from vlmerge.merge.resident import ResidentMerger, RuleTable, cache_tensor
from vlmerge.merge.sparsify import (
    check_indexable,
    delta_stats,
    draws_numpy,
    draws_torch,
    sparsify,
    tensor_generator,
    tensor_key,
)
from vlmerge.models.plan import TensorPlan
from vlmerge.models.towers import layer_of, module_kind

FUSED = [op for op in OPS if fused.supports(get_op(op))]
ROOT = Path(__file__).resolve().parents[2]


def make_inputs(shape, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    deltas = (0.1 * torch.randn((n, *shape), generator=g)).to(dtype)
    return base, deltas


def args_for(n, variant):
    weight, density, gamma = (0.6, -0.35, 0.9)[:n], (0.3, 0.7, 1.0)[:n], (0.05, 0.1, 0.0)[:n]
    switches = [{}, {"normalize": True, "rescale": True, "lambda_": 0.8}, {"normalize": False, "rescale": False}]
    return OpArgs(weight=weight, density=density, gamma=gamma, **switches[variant])


def both(op, base, deltas, args, stats=None):
    spec = get_op(op)
    ref = spec.fn(base, deltas, args, generator=tensor_generator(5, "m.w"), stats=stats)
    return ref, fused.merge_one(spec, base, deltas, args, seed=tensor_key(5, "m.w"), stats=stats)


@pytest.mark.parametrize("op", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fast_path_matches_the_reference(op, dtype):
    for n in (1, 2, 3):
        base, deltas = make_inputs((48, 40), n, dtype, seed=n)
        stats = delta_stats(deltas)
        for variant in range(3):
            args = args_for(n, variant)
            ref, fast = both(op, base, deltas, args, stats if variant == 1 else None)
            assert fast.dtype == dtype and fast.shape == base.shape
            if dtype == torch.bfloat16:  # fp32 values within rounding: at most one bf16 step apart, rarely
                torch.testing.assert_close(fast.float(), ref.float(), atol=1e-6, rtol=2**-7)
                assert (fast != ref).float().mean() < 0.01
            else:
                tol = 1e-12 if dtype == torch.float64 else 1e-5
                torch.testing.assert_close(fast, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("op", [op for op in FUSED if get_op(op).sparsification])
def test_same_kept_entries_as_the_reference(op):
    _, deltas = make_inputs((64, 50), 3, torch.float32, seed=7)
    base = torch.zeros(64, 50)  # merged zeros are exactly the dropped (or sign-rejected) entries
    for variant in range(3):
        args = dataclasses.replace(args_for(3, variant), density=(0.3, 0.5, 0.2))
        ref, fast = both(op, base, deltas, args, delta_stats(deltas))
        assert torch.equal(fast == 0, ref == 0)
        assert 0 < (fast == 0).float().mean() < 1


@pytest.mark.parametrize("op", ["linear", "ties", "dare_ties", "breadcrumbs"])
def test_out_gets_the_value_rounded_to_the_compute_dtype_once(op):
    base, deltas = make_inputs((30, 20), 2, torch.bfloat16, seed=2)
    spec, args, seed = get_op(op), args_for(2, 0), tensor_key(1, "x")
    alone = fused.merge_one(spec, base, deltas, args, seed=seed)
    into = fused.merge_one(spec, base, deltas, args, seed=seed, out=torch.full((30, 20), 9.0))
    assert into.dtype == torch.float32 and torch.equal(into, alone.float())
    wide = fused.merge_one(spec, base.float(), deltas.float(), args, seed=seed)
    narrow = fused.merge_one(spec, base.float(), deltas.float(), args, seed=seed, out=torch.empty(30, 20).bfloat16())
    assert torch.equal(narrow, wide.bfloat16())
    transposed = torch.zeros(20, 30).T  # a non-contiguous destination is filled too
    assert torch.equal(fused.merge_one(spec, base.float(), deltas.float(), args, seed=seed, out=transposed), wide)


@pytest.mark.parametrize("op", FUSED)
def test_chunks_do_not_change_the_values(op, monkeypatch):
    base, deltas = make_inputs((50, 41), 3, torch.float32, seed=4)
    args = args_for(3, 0)
    spec = get_op(op)
    whole = fused.merge_one(spec, base, deltas, args, seed=tensor_key(0, "c"))
    monkeypatch.setattr(fused, "CHUNK", 64)
    chunked = fused.merge_one(spec, base, deltas, args, seed=tensor_key(0, "c"))
    if fused.call_for_args(spec, args, 3, base.numel(), 0).rescale:  # float64 L1 sums in another order
        torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    else:
        assert torch.equal(chunked, whole)


def lowbias32(x: int) -> int:
    """Wellons' lowbias32 on a Python int: the hash spelled independently of the vectorised code."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_dare_draws_are_the_hash_in_numpy_and_torch():
    key = 0x9E3779B9
    for start, stop in [(0, 1000), (2**32 - 300, 2**32)]:
        expected = np.array([lowbias32(i ^ key) >> 8 for i in range(start, stop)], dtype=np.int64)
        assert np.array_equal(draws_numpy(start, stop, key).astype(np.int64), expected)
        assert np.array_equal(draws_torch(start, stop, key, "cpu").numpy(), expected)
    with pytest.raises(VlmergeError, match="32 bits"):
        check_indexable(2**32)


def test_dare_masks_per_source_seed_and_tensor():
    deltas = torch.randn(3, 300, 400, generator=torch.Generator().manual_seed(3))

    def mask(seed, name, density=(0.3, 0.3, 0.8)):
        return sparsify(deltas, "random", density, generator=tensor_generator(seed, name)) != 0

    first = mask(1, "a.w")
    torch.testing.assert_close(first.flatten(1).float().mean(1), torch.tensor([0.3, 0.3, 0.8]), atol=0.005, rtol=0)
    assert not torch.equal(first[0], first[1])  # sources draw independently
    assert torch.equal(first, mask(1, "a.w"))
    assert (first != mask(2, "a.w")).float().mean() > 0.2 and (first != mask(1, "b.w")).float().mean() > 0.2
    assert not (mask(1, "a.w", (0.2, 0.2, 0.2)) & ~first).any()  # nested in density


def fake_plans(layers=4):
    names = ["model.embed_tokens.weight"]
    for i in range(layers):
        names += [f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.mlp.up_proj.weight",
                  f"model.layers.{i}.input_layernorm.weight"]  # fmt: skip
    names.append("lm_head.weight")
    return [TensorPlan(name=n, target_key=n, source_keys=(n, n, n), base_key=n, layer=layer_of(n), kind=module_kind(n),
                       shape=(4, 3), rows=None) for n in names]  # fmt: skip


def test_rule_table_gives_args_for_values_for_every_tensor():
    plans = fake_plans()
    table = RuleTable(plans)
    rules = [{"weight": 0.5, "density": 0.9}, {"source": "ja", "weight": 1.2}, {"layers": [1, 2], "density": 0.4},
             {"kind": "mlp", "source": "math", "gamma": 0.2}, {"match": "q_proj", "weight": -0.3},
             {"layers": 2, "source": "target", "density": 0.7}, {"kind": "embedding", "t": 0.1}]  # fmt: skip
    for scale in (1.0, 0.5):  # the second resolve reuses the index with new values
        raw = [{k: v * scale if k in ("weight", "density") else v for k, v in r.items()} for r in rules]
        recipe = Recipe.from_dict({"op": "breadcrumbs", "sources": ["target", "ja", "math"], "rules": raw})
        values = table.resolve(recipe)
        for i, p in enumerate(plans):
            args = recipe.args_for(p.name, p.layer, p.kind)
            for name in ("weight", "density", "gamma"):
                assert tuple(values[name][i]) == getattr(args, name), (p.name, name)
    assert len(table._index) == 1


def resident_entries(shapes, dtype, ops, device="cpu"):
    g = torch.Generator().manual_seed(11)
    entries = []
    for name, (shape, rows) in shapes.items():
        shared = (rows, *shape[1:]) if rows else shape
        param = torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype).to(device), requires_grad=False)
        base = torch.randn(shared, generator=g).to(dtype).to(device)
        deltas = (0.05 * torch.randn((2, *shared), generator=g)).to(dtype).to(device)
        plan = TensorPlan(name=name, target_key=name, source_keys=(name, name), base_key=name, layer=layer_of(name),
                          kind=module_kind(name), shape=shape, rows=rows)  # fmt: skip
        entries.append(cache_tensor(plan, param, TensorInputs(base=base, deltas=deltas), ops))
    return entries


SHAPES = {"model.embed_tokens.weight": ((40, 16), 32), "model.layers.0.self_attn.q_proj.weight": ((16, 16), None),
          "model.layers.0.mlp.up_proj.weight": ((24, 16), None), "model.layers.1.mlp.up_proj.weight": ((24, 16), None),
          "model.layers.1.input_layernorm.weight": ((16,), None), "lm_head.weight": ((40, 16), 32)}  # fmt: skip
RECIPES = [{"weight": 0.6}, {"source": "ja", "weight": 1.3, "density": 0.5, "gamma": 0.02},
           {"layers": [1, 1], "density": 0.3}, {"kind": "embedding", "t": 0.3}]  # fmt: skip


def check_resident_equals_exporter(device: str, dtype: torch.dtype) -> None:
    """ResidentMerger.apply (what the search scores) == merge_tensor per tensor (what the exporter writes)."""
    entries = resident_entries(SHAPES, dtype, tuple(OPS), device)
    merger = ResidentMerger(entries, ("target", "ja"))
    for op in OPS:
        recipe = Recipe.from_dict({"op": op, "sources": ["target", "ja"], "rules": RECIPES, "seed": 3})
        before = [e.param.detach().clone() for e in entries]
        merger.apply(recipe)
        for entry, original in zip(entries, before):
            stats = entry.stats if get_op(op).uses_stats else None
            exported = merge_tensor(entry.plan, entry.inputs, recipe, stats=stats, out=original.clone())
            assert torch.equal(entry.param, exported), (op, entry.plan.name)
            if entry.plan.rows:
                assert torch.equal(entry.param[entry.plan.rows:], original[entry.plan.rows:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resident_merger_writes_what_the_exporter_writes(dtype):
    check_resident_equals_exporter("cpu", dtype)


def test_resident_merger_names_the_bad_parameter():
    merger = ResidentMerger(resident_entries(SHAPES, torch.float32, ("breadcrumbs",)), ("target", "ja"))
    # built directly: Recipe.from_dict refuses gamma 1.5 up front (tests/merge/test_recipe.py)
    recipe = Recipe(op="breadcrumbs", sources=("target", "ja"),
                    rules=(Rule(values={"weight": 1.0}), Rule(values={"gamma": 1.5}, source="ja", layers=(1, 1))))
    with pytest.raises(VlmergeError, match=r"gamma\[1\] = 1.5 is outside"):
        merger.apply(recipe)
    with pytest.raises(VlmergeError, match="sums to 0"):
        merger.apply(Recipe.from_dict({"op": "linear", "sources": ["target", "ja"],
                                       "rules": [{"weight": 1.0}, {"source": "ja", "weight": -1.0}]}))


def check_group_equals_cpu(device: str, dtypes: tuple[torch.dtype, ...]) -> None:
    """The Triton kernel over a group of tensors == fused.merge_cpu tensor by tensor (bitwise)."""
    from vlmerge.merge.fused_gpu import TritonGroup

    shapes = [(64, 48), (3000,), (37,), (5, 7), (4100,)]
    for dtype in dtypes:
        for op in FUSED:
            spec = get_op(op)
            for n in (1, 3):
                g = torch.Generator().manual_seed(n)
                bases = [torch.randn(s, generator=g).to(dtype) for s in shapes]
                deltas = [(0.1 * torch.randn((n, *s), generator=g)).to(dtype) for s in shapes]
                stats = [delta_stats(d) if spec.uses_stats else None for d in deltas]
                weight = np.array([(0.6, -0.35, 0.9)[:n]] * len(shapes))
                density = np.array([(0.4,) if n == 1 else (0.3, 0.7, 1.0)] * len(shapes))
                call = fused.gta_call(spec, weight, density, np.full_like(weight, 0.05),
                                      np.array([b.numel() for b in bases]),
                                      normalize=True if op == "ties" else None, rescale=None, lambda_=0.8,
                                      seeds=[tensor_key(1, f"t{i}") for i in range(len(shapes))])  # fmt: skip
                on = [(b.to(device), d.to(device)) for b, d in zip(bases, deltas)]
                outs = [torch.empty(b.numel(), dtype=dtype, device=device) for b in bases]
                sorted_abs = [None if s is None else s.sorted_abs.to(device) for s in stats]
                TritonGroup([b for b, _ in on], [d for _, d in on], sorted_abs).run(call, outs)
                for i, (b, d) in enumerate(zip(bases, deltas)):
                    expected = torch.empty(b.numel(), dtype=dtype)
                    fused.merge_cpu(call, i, b, d, expected, stats[i])
                    got = outs[i].cpu()
                    if call.rescale:  # float64 sums in another order: a last-bit difference, very rarely
                        assert (got != expected).float().mean() < 1e-3, (dtype, op, n, i)
                    else:
                        assert torch.equal(got, expected), (dtype, op, n, i)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("triton"), reason="needs triton")
def test_triton_kernel_interpreted_equals_the_cpu_code():
    """The kernel itself, run by Triton's CPU interpreter (its bf16 rounding is not the GPU's: 32/64-bit here)."""
    code = ("from tests.merge.test_fused import check_group_equals_cpu; import torch; "
            "check_group_equals_cpu('cpu', (torch.float32, torch.float64))")  # fmt: skip
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernel_equals_the_cpu_code_and_the_exporter():
    check_group_equals_cpu("cuda", (torch.float32, torch.bfloat16, torch.float64))
    for dtype in (torch.float32, torch.bfloat16):
        check_resident_equals_exporter("cuda", dtype)
