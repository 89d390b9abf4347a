"""Merge ops against mergekit 0.1.5 (the oracle), hand-written formulas, and their own contracts."""

import hashlib
import math

import pytest
import torch
from mergekit.merge_methods import get as mergekit_method
from mergekit.merge_methods import merge_tensors

from vlmerge.errors import VlmergeError
from vlmerge.merge.ops import OPS, OpArgs, check_args, get_op
from vlmerge.merge.sparsify import delta_stats, sparsify, tensor_generator

SHAPES = [(37,), (9, 14), (3, 4, 5)]
TOL = {"atol": 1e-6, "rtol": 1e-5}


def make_inputs(shape, n, seed=0, scale=0.1):
    """Base and source tensors, and deltas computed exactly as mergekit does (x_i - base)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    xs = [base + scale * torch.randn(shape, generator=g) for _ in range(n)]
    return base, xs, torch.stack([x - base for x in xs])


def oracle(op, base, xs, params):
    """mergekit's own method on the same tensors (task-arithmetic family: base first, as base_index 0)."""
    if op == "linear":
        return merge_tensors(xs, "linear", parameters=params)
    return merge_tensors([base, *xs], op, parameters=params, base_index=0)


def run_op(op, base, deltas, args, **kw):
    before = deltas.clone(), base.clone()
    out = get_op(op).fn(base, deltas, args, **kw)
    assert torch.equal(deltas, before[0]) and torch.equal(base, before[1]), "op modified its inputs"
    assert out.shape == base.shape and out.dtype == base.dtype
    return out


WEIGHTS = {1: (0.7,), 2: (0.6, -0.35), 3: (0.5, 0.3, 0.9)}
DENSITIES = {1: (0.4,), 2: (0.3, 1.0), 3: (0.25, 0.6, 0.9)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("normalize", [None, True, False])
def test_linear_matches_mergekit_and_formula(shape, n, normalize):
    base, xs, deltas = make_inputs(shape, n, seed=n)
    w = WEIGHTS[n]
    out = run_op("linear", base, deltas, OpArgs(weight=w, normalize=normalize))
    params = {"weight": list(w)} | ({} if normalize is None else {"normalize": normalize})
    torch.testing.assert_close(out, oracle("linear", base, xs, params), **TOL)
    by_hand = sum(wi * x for wi, x in zip(w, xs))
    if normalize in (None, True):
        by_hand = by_hand / sum(w)
    torch.testing.assert_close(out, by_hand, **TOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("normalize,lambda_", [(None, 1.0), (True, 0.8), (False, 1.3)])
def test_task_arithmetic_matches_mergekit_and_formula(shape, n, normalize, lambda_):
    base, xs, deltas = make_inputs(shape, n, seed=10 + n)
    w = WEIGHTS[n]
    out = run_op("task_arithmetic", base, deltas, OpArgs(weight=w, normalize=normalize, lambda_=lambda_))
    params = {"weight": list(w), "lambda": lambda_} | ({} if normalize is None else {"normalize": normalize})
    torch.testing.assert_close(out, oracle("task_arithmetic", base, xs, params), **TOL)
    mixed = sum(wi * (x - base) for wi, x in zip(w, xs))
    by_hand = base + lambda_ * (mixed / sum(w) if normalize else mixed)
    torch.testing.assert_close(out, by_hand, **TOL)


@pytest.mark.parametrize("op", ["ties", "breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize(
    "normalize,rescale,lambda_", [(None, None, 1.0), (True, True, 0.9), (False, False, 1.2)]
)
def test_magnitude_ops_match_mergekit(op, shape, n, normalize, rescale, lambda_):
    base, xs, deltas = make_inputs(shape, n, seed=20 + n)
    w, density = WEIGHTS[n], DENSITIES[n]
    gamma = (0.05,) * n if "breadcrumbs" in op else ()
    args = OpArgs(
        weight=w, density=density, gamma=gamma, normalize=normalize, rescale=rescale, lambda_=lambda_
    )
    params = {"weight": list(w), "density": list(density), "lambda": lambda_}
    params |= {"gamma": list(gamma)} if gamma else {}
    params |= {k: v for k, v in (("normalize", normalize), ("rescale", rescale)) if v is not None}
    expected = oracle(op, base, xs, params)
    torch.testing.assert_close(run_op(op, base, deltas, args), expected, **TOL)
    stats = delta_stats(deltas)
    torch.testing.assert_close(run_op(op, base, deltas, args, stats=stats), expected, **TOL)


def test_breadcrumbs_default_gamma_and_density_match_mergekit():
    base, xs, deltas = make_inputs((40, 25), 2, seed=3)
    out = run_op("breadcrumbs", base, deltas, OpArgs(weight=(1.0, 0.5)))
    torch.testing.assert_close(out, oracle("breadcrumbs", base, xs, {"weight": [1.0, 0.5]}), **TOL)
    out = run_op(
        "breadcrumbs", base, deltas, OpArgs(weight=(1.0, 0.5), density=(0.5, 0.95), gamma=(0.1, 0.2))
    )
    params = {
        "weight": [1.0, 0.5],
        "density": [0.5, 0.95],
        "gamma": [0.1, 0.2],
    }  # 0.95 + 0.2 > 1: fewer outliers
    torch.testing.assert_close(out, oracle("breadcrumbs", base, xs, params), **TOL)


@pytest.mark.parametrize("op", ["ties", "breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stats_give_bitwise_identical_results(op, dtype):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(64, 48, generator=g).to(dtype)
    # Rounded deltas: many equal magnitudes, so the threshold ties that argsort would split are exercised.
    deltas = (torch.randn(3, 64, 48, generator=g) * 8).round().div(64).to(dtype)
    stats = delta_stats(deltas)
    for density in [(0.1, 0.5, 0.99), (0.3, 1.0, 0.02), (1.0, 1.0, 1.0)]:
        args = OpArgs(weight=(0.5, 1.0, -0.4), density=density, gamma=(0.01, 0.3, 0.0), rescale=True)
        assert torch.equal(run_op(op, base, deltas, args), run_op(op, base, deltas, args, stats=stats))


def test_magnitude_threshold_keeps_ties_and_top_k():
    deltas = torch.tensor([[0.1, -0.5, 0.5, 0.2, -0.3, 0.5, 0.05, 0.0]])
    kept = sparsify(deltas, "magnitude", (0.25,))  # k = 2, boundary |0.5| shared by three entries
    assert torch.equal(kept, torch.tensor([[0.0, -0.5, 0.5, 0.0, 0.0, 0.5, 0.0, 0.0]]))
    kept = sparsify(deltas, "magnitude", (0.5,))  # k = 4: the four largest, no tie at 0.3
    assert torch.equal(kept != 0, torch.tensor([[False, True, True, False, True, True, False, False]]))
    kept = sparsify(deltas, "magnitude", (0.5,), rescale=True)
    torch.testing.assert_close(kept.abs().sum(), deltas.abs().sum())


def test_outlier_mask_drops_largest_gamma_and_smallest():
    deltas = torch.arange(1.0, 21.0)[None] * torch.tensor([1.0, -1.0]).repeat(10)[None]
    kept = sparsify(deltas, "magnitude_outliers", (0.5,), gamma=(0.1,))  # keep ranks 8..17 (|d| 9..18)
    assert torch.equal(kept.abs().nonzero()[:, 1] + 1, torch.arange(9, 19))


def mergekit_with_masks(monkeypatch, op, base, xs, params, masks):
    """mergekit's dare op with torch.bernoulli replaced by our masks (one call per source, in order)."""
    rows = iter(masks)
    monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **k: next(rows).to(p.dtype).reshape(p.shape))
    out = oracle(op, base, xs, params)
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("op", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("normalize,rescale", [(None, None), (True, False)])
def test_dare_matches_mergekit_with_the_same_mask(monkeypatch, op, shape, n, normalize, rescale):
    base, xs, deltas = make_inputs(shape, n, seed=30 + n)
    w, density = WEIGHTS[n], (0.3, 0.7, 0.5)[:n]
    args = OpArgs(weight=w, density=density, normalize=normalize, rescale=rescale)
    out = run_op(op, base, deltas, args, generator=tensor_generator(7, "layer.0.w"))
    masks = sparsify(deltas, "random", density, generator=tensor_generator(7, "layer.0.w")) != 0
    params = {"weight": list(w), "density": list(density)}
    params |= {k: v for k, v in (("normalize", normalize), ("rescale", rescale)) if v is not None}
    torch.testing.assert_close(out, mergekit_with_masks(monkeypatch, op, base, xs, params, masks), **TOL)


@pytest.mark.parametrize("op", ["dare_ties", "dare_linear"])
def test_dare_at_density_one_is_deterministic_mergekit(op):
    base, xs, deltas = make_inputs((11, 7), 3, seed=4)
    args = OpArgs(weight=(0.4, 0.8, 0.3), density=(1.0, 1.0, 1.0))
    out = run_op(op, base, deltas, args, generator=tensor_generator(0, "x"))
    expected = oracle(op, base, xs, {"weight": [0.4, 0.8, 0.3], "density": [1.0, 1.0, 1.0]})
    torch.testing.assert_close(out, expected, **TOL)


def test_dare_seeding_statistics_and_nested_masks():
    base, _, deltas = make_inputs((200, 500), 2, seed=8)
    args = OpArgs(weight=(1.0, 0.5), density=(0.2, 0.6))

    def run(seed, name="m.w"):
        return run_op("dare_ties", base, deltas, args, generator=tensor_generator(seed, name))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2)) and not torch.equal(run(1), run(1, "m.v"))
    kept = sparsify(deltas, "random", (0.2, 0.6), rescale=True, generator=tensor_generator(1, "m.w"))
    fraction = (kept != 0).flatten(1).float().mean(1)
    torch.testing.assert_close(fraction, torch.tensor([0.2, 0.6]), atol=0.01, rtol=0)
    torch.testing.assert_close(
        kept.abs().flatten(1).sum(1), deltas.abs().flatten(1).sum(1), atol=0, rtol=1e-5
    )
    low = sparsify(deltas, "random", (0.3, 0.3), generator=tensor_generator(3, "n")) != 0
    high = sparsify(deltas, "random", (0.7, 0.7), generator=tensor_generator(3, "n")) != 0
    assert not (low & ~high).any() and high.sum() > low.sum()
    with pytest.raises(ValueError, match="generator"):
        get_op("dare_linear").fn(base, deltas, args)


def test_tensor_generator_is_a_stable_sha256_seed():
    expected = int(hashlib.sha256(b"42:model.layers.3.mlp.up_proj.weight").hexdigest()[:16], 16) // 2
    assert tensor_generator(42, "model.layers.3.mlp.up_proj.weight").initial_seed() == expected
    assert tensor_generator(42, "a").initial_seed() != tensor_generator(43, "a").initial_seed()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.75, 1.0])
def test_slerp_matches_mergekit(shape, t):
    base, xs, deltas = make_inputs(shape, 2, seed=50, scale=1.0)
    out = run_op("slerp", base, deltas, OpArgs(t=t))
    # mergekit's slerp: xs[0] (the target) is base_model, the t = 0 end.
    torch.testing.assert_close(out, merge_tensors(xs, "slerp", parameters={"t": t}, base_index=0), **TOL)
    ends = {0.0: xs[0], 1.0: xs[1]}
    if t in ends:
        torch.testing.assert_close(out, ends[t], **TOL)


def test_slerp_colinear_falls_back_to_lerp():
    base = torch.zeros(6, 4)
    x0 = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    deltas = torch.stack([x0, 3 * x0])
    out = run_op("slerp", base, deltas, OpArgs(t=0.25))
    torch.testing.assert_close(out, 0.75 * x0 + 0.25 * 3 * x0, **TOL)
    torch.testing.assert_close(
        out, merge_tensors([x0, 3 * x0], "slerp", parameters={"t": 0.25}, base_index=0)
    )


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_op_keeps_dtype_and_shape_in_bf16(op):
    base, _, deltas = make_inputs((16, 8), 2, seed=9)
    base, deltas = base.bfloat16().float(), deltas.bfloat16().float()  # same kept entries in both dtypes
    args = OpArgs(weight=(0.5, 0.5), density=(0.5, 0.5), gamma=(0.01, 0.01), t=0.4)
    gen = tensor_generator(0, "w") if get_op(op).random else None
    out = run_op(op, base.bfloat16(), deltas.bfloat16(), args, generator=gen)
    reference = run_op(op, base, deltas, args, generator=tensor_generator(0, "w") if gen else None)
    torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("op", sorted(OPS))
def test_defaults_and_parameters_are_mergekits(op):
    spec, method = get_op(op), mergekit_method(op)
    theirs = {p.name: p for p in method.spec.parameters}
    for name in spec.shared:
        assert ("lambda" if name == "lambda_" else name) in theirs
    for name in ("normalize", "rescale"):
        if name in spec.shared:
            assert getattr(spec, name) == theirs[name].default
    per_input = {p.name for p in method.spec.input_parameters}
    assert set(spec.per_source) <= per_input
    if spec.sparsification:
        assert per_input == set(spec.per_source)
        assert method.sparsification_method.value == spec.sparsification
        assert (method.consensus_method is not None) == spec.consensus
        assert theirs["density"].default == 1.0 and theirs["lambda"].default == 1.0
    if "gamma" in spec.per_source:
        assert theirs["gamma"].default == 0.01
    assert spec.uses_stats == (op in ("ties", "breadcrumbs", "breadcrumbs_ties"))


def test_empty_tensors_merge_to_empty():
    base, deltas = torch.zeros(0, 4), torch.zeros(2, 0, 4)
    for op in OPS:
        args = OpArgs(weight=(1.0, 1.0), density=(0.5, 0.5), t=0.5)
        out = get_op(op).fn(base, deltas, args, generator=tensor_generator(0, "e"))
        assert out.shape == (0, 4)


BAD_ARGS = [
    ("ties", OpArgs(weight=(1.0, 1.0), density=(0.0, 0.5)), 2, r"density\[0\] = 0.0"),
    ("ties", OpArgs(weight=(1.0, 1.0), density=(0.5, 1.5)), 2, r"density\[1\] = 1.5"),
    ("dare_ties", OpArgs(weight=(1.0, float("nan")), density=(0.5, 0.5)), 2, r"weight\[1\] = nan"),
    ("linear", OpArgs(weight=(math.inf,)), 1, r"weight\[0\] = inf"),
    ("task_arithmetic", OpArgs(weight=(1.0,)), 2, r"weight = \(1.0,\) has 1 values for 2 sources"),
    ("ties", OpArgs(weight=(1.0, 1.0), density=(0.5,)), 2, r"density = \(0.5,\) has 1 values"),
    ("breadcrumbs", OpArgs(weight=(1.0,), gamma=(1.0,)), 1, r"gamma\[0\] = 1.0"),
    ("breadcrumbs", OpArgs(weight=(1.0,), gamma=(0.1, 0.1)), 1, r"gamma = \(0.1, 0.1\) has 2 values"),
    ("ties", OpArgs(), 1, r"weight = \(\) has 0 values"),
    ("slerp", OpArgs(t=0.5), 3, r"exactly 2 sources.*n = 3"),
    ("slerp", OpArgs(t=float("nan")), 2, r"t = nan"),
    ("task_arithmetic", OpArgs(weight=(1.0,), lambda_=float("inf")), 1, r"lambda_ = inf"),
    ("ties", OpArgs(weight=(1.0,), normalize="yes"), 1, r"normalize = 'yes'"),
    ("linear", OpArgs(weight=(1.0, -1.0)), 2, r"weight = \(1.0, -1.0\) sums to 0"),
    ("ties", OpArgs(weight=[1.0]), 1, r"weight must be a tuple"),
    ("ties", OpArgs(weight=()), 0, r"at least one source"),
]


@pytest.mark.parametrize("op,args,n,message", BAD_ARGS)
def test_bad_args_name_the_parameter(op, args, n, message):
    with pytest.raises(VlmergeError, match=message):
        check_args(op, args, n)
    if n:
        base, _, deltas = make_inputs((4,), n)
        with pytest.raises(VlmergeError, match=message):
            get_op(op).fn(base, deltas, args, generator=tensor_generator(0, "x"))


def test_unknown_op_and_bad_shapes_are_refused():
    with pytest.raises(VlmergeError, match="'tie'.*linear, task_arithmetic, ties, dare_ties"):
        get_op("tie")
    with pytest.raises(VlmergeError, match=r"deltas of shape \(2, 4, 3\).*base shape \(4, 4\)"):
        get_op("ties").fn(torch.zeros(4, 4), torch.zeros(2, 4, 3), OpArgs(weight=(1.0, 1.0)))
    base, _, deltas = make_inputs((5, 3), 2)
    with pytest.raises(VlmergeError, match=r"deltas are torch.bfloat16 on cpu but the base is torch.float32"):
        get_op("linear").fn(base, deltas.bfloat16(), OpArgs(weight=(1.0, 1.0)))
    with pytest.raises(VlmergeError, match=r"sorted_abs has shape \(1, 15\)"):
        get_op("ties").fn(base, deltas, OpArgs(weight=(1.0, 1.0), density=(0.5, 0.5)),
                          stats=delta_stats(deltas[:1]))  # fmt: skip
