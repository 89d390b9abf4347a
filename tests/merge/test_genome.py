"""Genome: layout, documented transforms, precedence of the decoded rules, encode, YAML, configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vlmerge.errors import VlmergeError
from vlmerge.merge.genome import Genome
from vlmerge.merge.recipe import Recipe
from vlmerge.models.towers import module_kind

SOURCES = ("target", "ja", "math")
CONF = Path(__file__).resolve().parents[2] / "conf" / "merge"


def tower_names(depth: int) -> list[str]:
    """Every kind of tower tensor a Mistral-like tower has, plus an odd one (kind `other`)."""
    per_layer = [
        "self_attn.q_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.down_proj.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "extra_bias",
    ]
    names = [f"model.layers.{i}.{p}" for i in range(depth) for p in per_layer]
    return ["model.embed_tokens.weight", *names, "model.norm.weight", "lm_head.weight"]


def layer_of(name: str) -> int | None:
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


def expected_label(genome: Genome, groups, name: str, layer: int | None, kind: str) -> str:
    """The cell a tensor belongs to, written from the module docstring (not from the genome's code)."""
    kinds = list(genome.kinds or [])
    whole = len(groups) == 1 and genome.outer == "nearest"
    if layer is None and genome.outer == "own":
        return "pre" if name.startswith("model.embed_tokens.") else "post"
    if whole:
        return "model" + (f"/{kinds[0]}" if kinds and kind not in kinds[1:] else f"/{kind}" if kinds else "")
    if layer is None:
        first, last = groups[0] if name.startswith("model.embed_tokens.") else groups[-1]
        return f"layers {first}-{last}" + (f"/{kinds[0]}" if kinds else "")
    first, last = next(g for g in groups if g[0] <= layer <= g[1])
    label = f"layers {first}-{last}"
    if not kinds:
        return label
    return f"{label}/{kind}" if kind in kinds[1:] else f"{label}/{kinds[0]}"


def transform(param: str, g: float) -> float:
    g = min(max(g, 0.0), 1.0)
    return {"weight": 2.0 * g, "density": max(g, 0.05), "gamma": 0.02 * g, "t": g}[param]


GENOMES = [
    Genome(op="dare_ties", groups="model"),
    Genome(op="dare_ties", groups="model", kinds=["attention", "mlp"]),
    Genome(op="dare_ties", groups="layer", outer="own"),
    Genome(op="ties", groups=3, kinds=["mlp", "attention", "norm"], outer="nearest"),
    Genome(op="ties", groups=[[0, 1], [2, 2], [3, 6]], outer="own", frozen={"target": {"weight": 1.0}}),
    Genome(op="task_arithmetic", params=["weight"], groups=4, kinds=["attention", "mlp"]),
    Genome(
        op="breadcrumbs",
        params=["weight", "gamma"],
        groups=2,
        fixed={"density": 0.7},
        frozen={"math": {"weight": 0.25, "gamma": 0.0}},
    ),
]


@pytest.mark.parametrize("genome", GENOMES, ids=lambda g: f"{g.op}-{g.groups}-{g.kinds}-{g.outer}")
def test_decoded_rules_give_every_tensor_exactly_its_gene_values(genome):
    depth = 7
    names = genome.gene_names(depth, SOURCES)
    x = np.random.default_rng(0).uniform(-0.2, 1.2, size=len(names))  # also outside [0, 1]: clipped
    recipe = genome.decode(x, depth, SOURCES, seed=3)
    groups = genome.layer_groups(depth)
    seen_genes = set()
    for name in tower_names(depth):
        layer, kind = layer_of(name), module_kind(name)
        args = recipe.args_for(name, layer, kind)
        label = expected_label(genome, groups, name, layer, kind)
        for i, source in enumerate(SOURCES):
            for param in ("weight", "density", "gamma"):
                got = getattr(args, param)[i]
                if param in genome.params and param not in genome.frozen.get(source, {}):
                    index = names.index(f"{label}/{source}/{param}")
                    seen_genes.add(index)
                    assert got == transform(param, x[index]), (name, source, param)
                elif param in genome.frozen.get(source, {}):
                    assert got == genome.frozen[source][param]
                elif param in genome.fixed:
                    assert got == genome.fixed[param]
    assert seen_genes == set(range(len(names)))  # every gene reaches some tensor
    assert recipe.seed == 3 and recipe.op == genome.op and recipe.sources == SOURCES
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


def test_slerp_t_per_group_and_kind():
    genome = Genome(op="slerp", params=["t"], groups=2, kinds=["attention", "mlp"])
    x = np.array([0.1, 0.2, 0.3, 0.4])
    recipe = genome.decode(x, 4, ("target", "ja"))
    assert recipe.args_for("model.layers.0.self_attn.q_proj.weight", 0, "attention").t == 0.1
    assert recipe.args_for("model.layers.1.mlp.up_proj.weight", 1, "mlp").t == 0.2
    assert recipe.args_for("model.layers.1.input_layernorm.weight", 1, "norm").t == 0.1  # follows attention
    assert recipe.args_for("model.layers.3.mlp.up_proj.weight", 3, "mlp").t == 0.4
    assert recipe.args_for("model.embed_tokens.weight", None, "embedding").t == 0.1  # first group
    assert recipe.args_for("lm_head.weight", None, "embedding").t == 0.3  # last group
    with pytest.raises(VlmergeError, match="exactly 2 sources"):
        genome.layout(4, SOURCES)


def test_x0_decodes_to_the_documented_values():
    genome = Genome(op="dare_ties", groups="layer", outer="own")
    x0 = genome.x0(5, SOURCES)
    assert x0.shape == (7 * 3 * 2,) and set(x0) == {0.5}
    recipe = genome.decode(x0, 5, SOURCES)
    for name in tower_names(5):
        args = recipe.args_for(name, layer_of(name), module_kind(name))
        assert args.weight == (1.0, 1.0, 1.0) and args.density == (0.5, 0.5, 0.5)
    crumbs = Genome(op="breadcrumbs", params=["gamma"]).decode([0.5] * 3, 5, SOURCES)
    assert crumbs.args_for("lm_head.weight", None, "embedding").gamma == (0.01, 0.01, 0.01)
    assert Genome(op="slerp", params=["t"]).decode([0.5], 5, SOURCES[:2]).args_for("x", 0, "mlp").t == 0.5


@pytest.mark.parametrize("depth", [1, 5, 7, 10, 13, 32])
def test_layer_groups_cover_every_layer_once_in_nearly_equal_parts(depth):
    for n in range(1, depth + 1):
        groups = Genome(groups=n).layer_groups(depth)
        layers = [i for first, last in groups for i in range(first, last + 1)]
        assert layers == list(range(depth)) and len(groups) == n
        sizes = {last - first + 1 for first, last in groups}
        assert max(sizes) - min(sizes) <= 1
    assert Genome(groups=3).layer_groups(10) == ((0, 3), (4, 6), (7, 9))
    with pytest.raises(VlmergeError, match="only"):
        Genome(groups=depth + 1).layer_groups(depth)


def test_encode_inverts_decode_and_reads_uniform_recipes():
    genome = Genome(
        op="ties", groups=3, kinds=["attention", "mlp"], outer="own", frozen={"target": {"weight": 1.0}}
    )
    x = np.random.default_rng(1).uniform(0.05, 1.0, size=genome.n_genes(8, SOURCES))
    assert np.allclose(genome.encode(genome.decode(x, 8, SOURCES), 8), x, rtol=0, atol=1e-12)
    uniform = Recipe.from_yaml(
        "op: ties\nsources: [target, ja, math]\nrules:\n- {source: target, weight: 1.0, density: 0.3}\n"
        "- {source: ja, weight: 1.5, density: 0.8}\n- {source: math, weight: 0.5, density: 0.6}\n"
    )
    genes = genome.encode(uniform, 8).reshape(-1, 5)  # per cell: target density, ja w/d, math w/d
    assert np.allclose(genes, [0.3, 0.75, 0.8, 0.25, 0.6])


def test_encode_refuses_what_the_genome_cannot_express():
    genome = Genome(op="ties", groups=2)
    per_layer = Genome(op="ties", groups="layer").decode(np.linspace(0.1, 0.9, 4 * 3 * 2), 4, SOURCES)
    with pytest.raises(VlmergeError, match="differs within genome cell 'layers 0-1'"):
        genome.encode(per_layer, 4)
    too_heavy = Recipe.from_yaml("op: ties\nsources: [target, ja, math]\nrules:\n- {weight: 3.0}\n")
    with pytest.raises(VlmergeError, match=r"weight = 3.0 is outside the genome's range \[0.0, 2.0\]"):
        genome.encode(too_heavy, 4)
    with pytest.raises(VlmergeError, match="cannot encode a 'linear' recipe"):
        genome.encode(Recipe(op="linear", sources=SOURCES), 4)
    frozen = Genome(op="ties", frozen={"target": {"weight": 1.0}})
    with pytest.raises(VlmergeError, match="fixes it at 1.0"):
        frozen.encode(too_heavy, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"op": "linear", "params": ["density"]}, r"merge.genome.params = \['density'\]"),
        ({"op": "slerp", "params": ["weight"]}, "among \\['t'\\]"),
        ({"groups": [[0, 2], [4, 5]]}, "without gaps or overlaps"),
        ({"groups": [[1, 2]]}, "start at layer 0"),
        ({"groups": "layers"}, "use model, layer"),
        ({"groups": 0}, "at least one group"),
        ({"kinds": ["attn"]}, "merge.genome.kinds"),
        ({"outer": "separate"}, "merge.genome.outer"),
        ({"frozen": {"ja": {"t": 0.5}}}, "merge.genome.frozen.ja.t"),
        ({"fixed": {"weight": 1.0}}, "merge.genome.fixed.weight"),
        ({"fixed": {"density": 0.0}, "params": ["weight"]}, r"merge.genome.fixed.density = 0.0 is outside"),
        ({"d_min": 0.0}, "0 < d_min"),
        ({"op": "nope"}, "unknown merge op 'nope'"),
    ],
)
def test_bad_genome_configs_name_the_key(kwargs, message):
    with pytest.raises(VlmergeError, match=message):
        Genome(**kwargs)


def test_layout_checks_against_the_pool():
    with pytest.raises(VlmergeError, match="groups end at layer 5; the tower has 8 layers"):
        Genome(groups=[[0, 5]]).layout(8, SOURCES)
    with pytest.raises(VlmergeError, match=r"frozen names \['llm'\]"):
        Genome(frozen={"llm": {"weight": 1.0}}).layout(8, SOURCES)
    with pytest.raises(VlmergeError, match="vector has 3 genes"):
        Genome().decode([0.5] * 3, 8, SOURCES)


GENOME_CONFIGS = [
    p for p in sorted(CONF.glob("*.yaml")) if "genome" in OmegaConf.load(p)
]  # (dfs.yaml: a path)


@pytest.mark.parametrize("path", GENOME_CONFIGS, ids=lambda p: p.stem)
def test_merge_configs_instantiate_and_decode(path):
    cfg = OmegaConf.load(path)
    genome = instantiate(cfg.genome)
    assert isinstance(genome, Genome) and genome.op == cfg.op
    sources = SOURCES[:2]
    recipe = genome.decode(genome.x0(6, sources), 6, sources)
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert genome.n_genes(6, sources) == len(genome.gene_names(6, sources)) >= 1


def test_every_op_config_is_tested():
    assert {p.stem for p in GENOME_CONFIGS} >= {"ties_dare", "ties", "task_arithmetic", "linear", "slerp"}


def test_paper_setting_gene_count():
    genome = instantiate(OmegaConf.load(CONF / "ties_dare.yaml").genome)
    # 32 layers + embedding + head, 2 sources, weight and density: 136 genes (popsize 18)
    assert genome.n_genes(32, ("target", "ja")) == 136
