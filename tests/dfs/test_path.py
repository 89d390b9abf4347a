"""DFS genome and LayerPath: layout, x0, decode/encode round trips, config, and every bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vlmerge.dfs.path import MAX_REPEATS, SCALINGS, EmptyPathError, LayerPath, PathSpec
from vlmerge.errors import VlmergeError

CONF = Path(__file__).resolve().parents[2] / "conf" / "merge" / "dfs.yaml"


def random_genes(spec: PathSpec, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = spec.x0() + rng.normal(0.0, 0.8, spec.n_genes)
    x[: spec.n_slots] = np.where(rng.random(spec.n_slots) < 0.4, 1.0, -1.0) * rng.random(spec.n_slots)
    x[0] = abs(x[0]) + 0.1  # never empty
    return x


def test_layout_sizes_and_labels():
    for scaling, n_scale in zip(SCALINGS, (49, 7, 4, 0), strict=True):
        spec = PathSpec(depth_a=4, depth_b=3, repeats=2, scaling=scaling)
        assert (spec.m, spec.n_slots, spec.n_scale_genes) == (7, 14, n_scale)
        assert spec.n_genes == 14 + n_scale == len(spec.labels()) == spec.x0().shape[0]
    labels = PathSpec(depth_a=2, depth_b=2, repeats=2, scaling="full").labels()
    assert labels[:5] == ["on[r0:A0]", "on[r0:A1]", "on[r0:B0]", "on[r0:B1]", "on[r1:A0]"]
    assert labels[8 + 1] == "W[A0->A1]" and labels[8 + 2 * 4 + 3] == "W[B0->B1]"


def test_x0_inits():
    assert PathSpec(depth_a=4, depth_b=3).decode(PathSpec(depth_a=4, depth_b=3).x0()) == LayerPath.identity(
        4, 3
    )
    every = PathSpec(depth_a=2, depth_b=2, repeats=3, init="a_every")
    path = every.decode(every.x0())
    assert path.layers == (0, 1, 0, 1, 0, 1) and set(path.scales) == {1.0}
    both = PathSpec(depth_a=2, depth_b=2, repeats=2, init="all", margin=0.3)
    assert both.decode(both.x0()).layers == (0, 1, 2, 3) * 2
    assert set(np.abs(both.x0()[:8])) == {0.3}


def test_decode_reads_slots_and_w():
    spec = PathSpec(depth_a=2, depth_b=2, repeats=2, scaling="full")
    x = np.full(spec.n_genes, -1.0)
    x[spec.n_slots :] = 0.0
    x[[0, 3, 7]] = 1.0  # A0, B1 (slot 3), B1 (slot 7, repetition 2)
    x[spec.n_slots + 0 * 4 + 3] = math.log(2.0)  # W[A0->B1]
    x[spec.n_slots + 3 * 4 + 3] = 9.0  # W[B1->B1], clipped to log 4
    path = spec.decode(x)
    assert path.layers == (0, 3, 3) and path.steps() == (("A", 0), ("B", 1), ("B", 1))
    assert path.scales == pytest.approx((2.0, 4.0))
    assert path.cumulative() == pytest.approx((1.0, 2.0, 8.0))
    assert path.describe() == "A0 x2 B1 x4 B1"


def test_low_parameter_forms_share_genes():
    per_target = PathSpec(depth_a=2, depth_b=2, repeats=2, scaling="per_target")
    x = np.concatenate([np.ones(8), np.log([1.0, 1.5, 0.5, 3.0])])
    path = per_target.decode(x)
    assert path.layers == (0, 1, 2, 3, 0, 1, 2, 3)
    assert path.scales == pytest.approx((1.5, 0.5, 3.0, 1.0, 1.5, 0.5, 3.0))
    pair = PathSpec(depth_a=2, depth_b=2, repeats=2, scaling="tower_pair")
    path = pair.decode(np.concatenate([np.ones(8), np.log([1.1, 1.2, 1.3, 1.4])]))  # AA, AB, BA, BB
    assert path.scales == pytest.approx((1.1, 1.2, 1.4, 1.3, 1.1, 1.2, 1.4))
    none = PathSpec(depth_a=2, depth_b=2, repeats=2, scaling="none")
    assert set(none.decode(np.ones(8)).scales) == {1.0}


@pytest.mark.parametrize("scaling", SCALINGS)
def test_encode_inverts_decode(scaling):
    spec = PathSpec(depth_a=3, depth_b=2, repeats=3, scaling=scaling)
    for seed in range(20):
        path = spec.decode(random_genes(spec, seed))
        again = spec.decode(spec.encode(path))
        assert again.layers == path.layers
        assert again.scales == pytest.approx(path.scales, rel=1e-12)
    assert spec.decode(spec.encode(LayerPath.identity(3, 2))) == LayerPath.identity(3, 2)


def test_encode_refuses_what_the_genome_cannot_express():
    spec = PathSpec(depth_a=2, depth_b=2, repeats=1, scaling="per_target")
    with pytest.raises(VlmergeError, match=r"position 1 \(A0\) does not fit in 1 repetition"):
        spec.encode(LayerPath((1, 0), (1.0,), 2, 2))
    with pytest.raises(VlmergeError, match=r"disagree on gene W\[->B1\] \(1.5 vs 2.0 on A1 -> B1\)"):
        PathSpec(depth_a=2, depth_b=2, repeats=2, scaling="per_target").encode(
            LayerPath((0, 3, 1, 3), (1.5, 1.0, 2.0), 2, 2)
        )
    with pytest.raises(VlmergeError, match="scaling = none allows only 1"):
        PathSpec(depth_a=2, depth_b=2, scaling="none").encode(LayerPath((0, 1), (2.0,), 2, 2))
    with pytest.raises(VlmergeError, match=r"outside \[0.25, 4.0\]"):
        spec.encode(LayerPath((0, 1), (8.0,), 2, 2))
    with pytest.raises(VlmergeError, match="towers of 3 \\+ 2 layers, the genome for 2 \\+ 2"):
        spec.encode(LayerPath.identity(3, 2))


def test_bad_genes():
    spec = PathSpec(depth_a=2, depth_b=2, repeats=2)
    with pytest.raises(EmptyPathError, match="selects no layer: all 8 indicator genes are <= 0"):
        spec.decode(np.concatenate([np.zeros(8), np.zeros(16)]))
    x = spec.x0()
    x[9] = np.nan
    with pytest.raises(VlmergeError, match=r"gene 9 \(W\[A0->A1\]\) is nan"):
        spec.decode(x)
    with pytest.raises(
        VlmergeError, match=r"needs 24 genes \(8 indicators \+ 16 scalings\), got shape \(5,\)"
    ):
        spec.decode(np.zeros(5))


@pytest.mark.parametrize(("scales", "message"), [
    ((0.0,), "is 0.0; scalings must be positive"), ((-1.0,), "is -1.0"), ((math.inf,), "is inf"),
    ((math.nan,), "is nan"), ((), "2 layers and 0 scalings"),
])  # fmt: skip
def test_bad_scalings(scales, message):
    with pytest.raises(VlmergeError, match=message):
        LayerPath((0, 2), scales, 2, 2)


def test_bad_paths():
    with pytest.raises(EmptyPathError, match="selects no layer"):
        LayerPath((), (), 2, 2)
    with pytest.raises(VlmergeError, match=r"layers \[4\] are outside 0..3"):
        LayerPath((0, 4), (1.0,), 2, 2)
    with pytest.raises(VlmergeError, match="product of the scalings up to position 2 is inf"):
        LayerPath((0, 1, 0, 1), (1e200, 1e200, 1e200), 2, 2)
    with pytest.raises(VlmergeError, match="layer 'C1' is neither"):
        LayerPath.from_dict({"depth_a": 2, "depth_b": 2, "layers": ["A0", "C1"]})
    with pytest.raises(VlmergeError, match=r"missing key\(s\) \['layers'\]"):
        LayerPath.from_dict({"depth_a": 2, "depth_b": 2})


def test_path_round_trips_through_a_dict():
    path = LayerPath((0, 3, 1, 3), (1.5, 0.5, 2.0), 2, 2)
    assert path.to_dict()["layers"] == ["A0", "B1", "A1", "B1"]
    assert LayerPath.from_dict(path.to_dict()) == path
    assert LayerPath.from_dict({"depth_a": 2, "depth_b": 2, "layers": [0, 1]}) == LayerPath.identity(2, 2)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"repeats": 0}, r"repeats \(r\) = 0"), ({"repeats": MAX_REPEATS + 1}, "integer in 1..16"),
    ({"repeats": 2.5}, "repeats"),
    ({"layers": 9}, r"layers \(M\) = 9 but the towers have 4 \(A\) \+ 4 \(B\) = 8"),
    ({"depth_b": 0}, "depths must be >= 1"), ({"scaling": "diag"}, "scaling = 'diag'"),
    ({"init": "b_first"}, "init = 'b_first'"), ({"margin": 0.0}, "margin"),
    ({"scale_min": 0.0}, "scale range"), ({"scale_max": 0.5}, "scale range"),
])  # fmt: skip
def test_bad_spec(kwargs, message):
    with pytest.raises(VlmergeError, match=message):
        PathSpec(**{"depth_a": 4, "depth_b": 4, **kwargs})


def test_config_instantiates_the_genome():
    cfg = OmegaConf.load(CONF)
    spec = instantiate(cfg.path)(depth_a=4, depth_b=4)
    assert isinstance(spec, PathSpec) and spec.n_slots == 8 * spec.repeats
    assert spec.decode(spec.x0()) == LayerPath.identity(4, 4)
    assert instantiate(cfg.path_model).keywords == {"fold": True}
