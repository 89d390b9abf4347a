"""The path model: identity is tower A bit for bit, no weight copies, KV cache, fold vs literal, bad input."""

from __future__ import annotations

import pytest
import torch

from tests.dfs.conftest import load_target, logits, random_path
from vlmerge.dfs.model import PathModel
from vlmerge.dfs.path import LayerPath
from vlmerge.errors import VlmergeError

FAMILIES = ("causal_lm", "llava", "llava_next", "composite")


def target_dir(tiny, family: str):
    return {
        "causal_lm": tiny.ja,
        "llava": tiny.llava,
        "llava_next": tiny.llava_next,
        "composite": tiny.composite,
    }[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_path_is_tower_a_exactly(tiny, family):
    model, batch = load_target(target_dir(tiny, family), family)
    expected = logits(model, batch)
    pm = PathModel(model, tiny.math)
    with pm.installed(LayerPath.identity(4, 4)):
        assert torch.equal(logits(model, batch), expected)
    with pm.installed(random_path(4, 4, seed=1)):
        assert not torch.allclose(logits(model, batch), expected, atol=1e-3)
    assert torch.equal(logits(model, batch), expected)  # reset: A again


def test_views_share_the_resident_weights(tiny):
    model, batch = load_target(tiny.ja, "causal_lm")
    pm = PathModel(model, tiny.math)
    resident = {p.data_ptr() for p in model.parameters()} | {p.data_ptr() for p in pm.layers_b.parameters()}
    path = LayerPath((0, 5, 1, 5, 5, 3), (2.0, 0.5, 1.0, 3.0, 0.3), 4, 4)
    with pm.installed(path):
        stack = model.model
        assert model.config.num_hidden_layers == len(stack.layers) == 6
        assert {p.data_ptr() for p in stack.layers.parameters()} <= resident
        assert [layer.self_attn.layer_idx for layer in stack.layers] == list(range(6))
        before = logits(model, batch)
        with torch.no_grad():  # an in-place write (a PS merger's) is seen by the installed path
            pm.layers_b[1].mlp.up_proj.weight.mul_(1.5)
        assert not torch.allclose(logits(model, batch), before, atol=1e-4)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    assert model.config.num_hidden_layers == 4 and pm.layers_b[1].self_attn.layer_idx == 1


def test_reset_after_an_error_inside(tiny):
    model, batch = load_target(tiny.ja, "causal_lm")
    expected = logits(model, batch)
    pm = PathModel(model, tiny.math)
    with pytest.raises(RuntimeError, match="boom"), pm.installed(random_path(4, 4, seed=2)):
        raise RuntimeError("boom")
    assert torch.equal(logits(model, batch), expected) and pm.path is None


@pytest.mark.parametrize("family", ["causal_lm", "llava"])
def test_generation_with_kv_cache_equals_without(tiny, family):
    model, batch = load_target(target_dir(tiny, family), family)
    pm = PathModel(model, tiny.math)
    path = LayerPath((0, 1, 6, 1, 2, 6, 3), (1.5, 0.6, 2.0, 1.0, 0.8, 1.2), 4, 4)  # A1 and B2 twice
    with pm.installed(path):
        cached = model.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape[-1] >= 8 and torch.equal(cached, uncached)


def _set_eps(pm: PathModel, eps: float) -> None:
    for module in [*pm.model.modules(), *pm.layers_b.modules()]:
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = eps


def test_fold_equals_the_literal_scaling_up_to_rmsnorm_eps(tiny):
    """The hint, checked: fed C*x, a pre-norm layer is C times the layer with o_proj, down_proj / C fed x."""
    path = LayerPath((0, 5, 1, 6, 6, 3), (1.7, 0.4, 2.5, 0.8, 3.0), 4, 4)
    results = {}
    for eps in (0.0, 1e-6):
        for fold in (True, False):
            model, batch = load_target(tiny.ja, "causal_lm")
            pm = PathModel(model, tiny.math, fold=fold)
            _set_eps(pm, eps)
            with pm.installed(path):
                results[eps, fold] = logits(model, batch)
    exact = (results[0.0, True] - results[0.0, False]).abs().max().item()
    with_eps = (results[1e-6, True] - results[1e-6, False]).abs().max().item()
    assert exact < 1e-5  # fp32 rounding only
    assert (
        1e-6 < with_eps < 1e-2
    )  # eps / C^2 against this tiny model's hidden variance (~1e-3): visible, small


def test_qwen2_layer_types_follow_the_path(tiny):
    model, batch = load_target(tiny.qwen_ft, "causal_lm")
    pm = PathModel(model, tiny.qwen_base)
    path = random_path(4, 4, seed=3)
    with pm.installed(path):
        assert model.config.layer_types == ["full_attention"] * len(path.layers)
        assert torch.isfinite(logits(model, batch)).all()
    assert model.config.layer_types == ["full_attention"] * 4


def test_incompatible_towers_are_named(tiny, odd):
    model, _ = load_target(tiny.ja, "causal_lm")
    with pytest.raises(VlmergeError, match=r"incompatible: num_key_value_heads \(A 2, B 4\)"):
        PathModel(model, odd.heads)
    with pytest.raises(VlmergeError, match=r"hidden_size \(A 32, B 48\); num_attention_heads \(A 4, B 6\)"):
        PathModel(model, odd.wide)


def test_post_norm_family_refuses_folding_and_runs_literally(odd):
    model, batch = load_target(odd.olmo, "causal_lm")
    with pytest.raises(VlmergeError, match=r"'olmo2' \(Olmo2DecoderLayer\) is not a known pre-norm"):
        PathModel(model, odd.olmo_b)
    expected = logits(model, batch)
    pm = PathModel(model, odd.olmo_b, fold=False)
    with pm.installed(LayerPath.identity(4, 4)):
        assert torch.equal(logits(model, batch), expected)
    with pm.installed(LayerPath((0, 4, 0, 7), (2.0, 0.5, 1.5), 4, 4)):
        cached = model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=True)
        assert torch.equal(
            cached, model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=False)
        )


def test_path_for_other_towers_is_refused(tiny):
    model, _ = load_target(tiny.ja, "causal_lm")
    pm = PathModel(model, tiny.math)
    with pytest.raises(VlmergeError, match=r"towers of 4 \+ 2 layers; this model has 4 \(A\) \+ 4 \(B\)"):
        pm.apply(LayerPath.identity(4, 2))
