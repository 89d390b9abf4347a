"""DFS search pieces in process: which search a merge config asks for, x0 = tower A, empty paths, the worker
factory (plain dfs without a merger; ps_dfs with the PS recipe in A), and early refusals."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.test_run import write_vqa
from vlmerge.candidates import MergeContext
from vlmerge.cli import config_dir
from vlmerge.dfs.search import PathFitnessFactory, PathStage, describe_genes, donor_of, merge_kind
from vlmerge.errors import VlmergeError
from vlmerge.eval.evaluator import evaluate
from vlmerge.merge.recipe import Recipe
from vlmerge.models.pool import Pool
from vlmerge.run import keep_tower_a, ps_stage_search, run
from vlmerge.search.fitness import evaluate_safely

LAYER0 = "model.language_model.layers.0.mlp.down_proj.weight"


def composed(*overrides: str) -> dict:
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


@pytest.fixture(scope="module")
def vqa_cfg(tiny, tmp_path_factory):
    data = write_vqa(tmp_path_factory.mktemp("dfs_search") / "vqa")
    return [f"pool.target.path={tiny.llava}", f"pool.donors.ja.path={tiny.ja}", f"pool.base.path={tiny.base}",
            f"task.data={data}", "task.max_new_tokens=3", "task.stop=[]", "merge.path.repeats=2",
            "merge.path.scaling=per_target"]  # fmt: skip


@pytest.mark.parametrize(
    ("merge", "kind"), [("dfs", "dfs"), ("ps_dfs", "ps_dfs"), ("ties_dare", "ps"), ("slerp", "ps")]
)
def test_each_merge_config_names_its_search(merge, kind):
    assert merge_kind(composed(f"merge={merge}")["merge"]) == kind


def test_ps_dfs_config_is_the_ps_genome_and_the_dfs_path():
    cfg = composed("merge=ps_dfs", "search.budget=30", "merge.genome.groups=2", "merge.path.repeats=2")
    assert cfg["merge"]["op"] == "dare_ties" and cfg["merge"]["genome"]["groups"] == 2
    assert cfg["merge"]["path"]["repeats"] == 2 and cfg["merge"]["donor"] is None
    assert cfg["merge"]["ps"] == {"budget": 30, "popsize": None, "sigma0": pytest.approx(1 / 6)}


def test_merge_configs_that_ask_for_no_search_are_refused():
    with pytest.raises(VlmergeError, match="neither `genome`.*nor `path`"):
        merge_kind({"op": "ties"})
    with pytest.raises(VlmergeError, match="merge.ps .*needs both"):
        merge_kind({"genome": {"op": "ties"}, "ps": {"budget": 3}})


def test_donor_is_named_or_the_only_one(tiny):
    ref = {name: {"path": str(getattr(tiny, name))} for name in ("ja", "math", "vlm_lm", "base")}
    one = Pool(target=ref["ja"], donors={"math": ref["math"]}, base=ref["base"], verbose=False)
    assert donor_of(one, None) == "math" and donor_of(one, "math") == "math"
    with pytest.raises(VlmergeError, match=r"'ja' is not a donor of the pool; its donors are \['math'\]"):
        donor_of(one, "ja")
    donors = {"math": ref["math"], "vlm": ref["vlm_lm"]}
    two = Pool(target=ref["ja"], donors=donors, base=ref["base"], verbose=False)
    with pytest.raises(VlmergeError, match=r"2 donors \['math', 'vlm'\]; name the one that is tower B"):
        donor_of(two, None)


@pytest.fixture(scope="module")
def stage(vqa_cfg):
    cfg = composed("merge=dfs", *vqa_cfg)
    context = MergeContext.build(cfg, verbose=False)
    return cfg, PathStage.build(context, cfg["merge"])


def test_x0_is_tower_a_and_scores_as_the_target(stage):
    cfg, st = stage
    x0 = st.problem().x0
    assert st.spec.n_genes == x0.size == 8 * 2 + 8  # 2 repetitions of 4 + 4 layers, per_target scalings
    path = st.decode(x0)
    assert path.layers == (0, 1, 2, 3) and set(path.scales) == {1.0}
    outcome = evaluate_safely(st.problem().fitness, x0)
    st.context.merger.load_source("target")
    plain = evaluate(st.context.bundle, st.context.task, "search")
    assert outcome.error is None and outcome.fitness == plain.fitness
    assert outcome.details == {**plain.values, "layers": 4}


def test_an_empty_path_is_a_failed_candidate_not_a_crash(stage):
    _, st = stage
    x = st.problem().x0.copy()
    x[: st.spec.n_slots] = -1.0
    outcome = evaluate_safely(st.problem().fitness, x)
    assert outcome.fitness is None and "selects no layer" in outcome.error
    assert describe_genes(st.spec, x) is None
    assert st.path_model.path is None  # nothing left installed
    assert describe_genes(st.spec, st.problem().x0)["layers"] == ["A0", "A1", "A2", "A3"]


def test_scores_follow_the_path_and_restore_puts_tower_a_back(stage):
    _, st = stage
    x = st.problem().x0.copy()
    x[4:6] = 1.0  # slots 4, 5 = B0, B1 of the first repetition
    x[st.spec.n_slots + 5] = np.log(2.0)  # hop into B1 scaled by 2
    path = st.decode(x)
    assert [path.name(i) for i in path.layers] == ["A0", "A1", "A2", "A3", "B0", "B1"]
    assert path.scales == (1.0, 1.0, 1.0, 1.0, pytest.approx(2.0))
    model = st.context.bundle.model
    st.restore_a()
    target = {k: v.clone() for k, v in model.state_dict().items()}
    expected = st.score(path, "search")
    st.context.merger.apply(Recipe(op="linear", sources=("target", "ja")))  # other weights in A ...
    assert not torch.equal(model.state_dict()[LAYER0], target[LAYER0])
    restored = st.score(path, "search", restore=True)  # ... are replaced by the target's first
    assert all(torch.equal(v, target[k]) for k, v in model.state_dict().items())
    assert restored.outputs == expected.outputs and restored.values == expected.values
    assert model.config.text_config.num_hidden_layers == 4  # uninstalled


def test_worker_factory_is_picklable_and_builds_the_same_fitness(stage, vqa_cfg):
    cfg, st = stage
    factory = pickle.loads(pickle.dumps(PathFitnessFactory(cfg)))
    fitness = factory()
    assert fitness.stage.context.merger is None  # plain DFS: the worker caches no task vectors
    rng = np.random.default_rng(3)
    x = st.problem().x0 + rng.normal(0, 0.4, st.spec.n_genes)
    st.restore_a()
    assert fitness(x) == st.problem().fitness(x)


def test_ps_dfs_worker_holds_the_ps_recipe_in_tower_a(vqa_cfg):
    cfg = composed("merge=ps_dfs", "merge.genome.groups=model", *vqa_cfg)
    recipe = Recipe.from_dict({"op": "dare_ties", "sources": ["target", "ja"], "seed": 0,
                               "rules": [{"weight": 0.7, "density": 0.6}]})  # fmt: skip
    main = PathStage.build(MergeContext.build(cfg, verbose=False), cfg["merge"], ps_recipe=recipe)
    worker = PathFitnessFactory(cfg, recipe.to_dict())()
    assert worker.stage.ps_recipe == recipe
    first = {k: v.clone() for k, v in main.context.bundle.model.named_parameters()}
    for name, param in worker.stage.context.bundle.model.named_parameters():
        assert torch.equal(param, first[name]), name
    main.context.merger.load_source("target")
    assert not torch.equal(main.context.bundle.model.state_dict()[LAYER0], first[LAYER0])  # A was the merge
    main.restore_a()
    x = main.problem().x0.copy()
    x[6] = 1.0  # B2 after A's layers
    assert worker(x) == main.problem().fitness(x)


def test_unfoldable_scalings_are_refused_before_the_search(odd, tmp_path):
    """fold=false runs any family, but a scaled path of a post-norm family cannot be exported at the end."""
    from vlmerge.eval.loading import load_model

    pool = Pool(target={"path": str(odd.olmo)}, donors={"b": {"path": str(odd.olmo_b)}}, verbose=False)
    context = MergeContext(pool=pool, task=None, bundle=load_model({"path": str(odd.olmo)}), merger=None,
                           genome=None, seed=0)  # fmt: skip
    merge = composed("merge=dfs", "merge.path_model.fold=false")["merge"]
    with pytest.raises(VlmergeError, match="olmo2.*cannot be folded"):
        PathStage.build(context, merge)
    unscaled = composed("merge=dfs", "merge.path_model.fold=false", "merge.path.scaling=none")["merge"]
    assert PathStage.build(context, unscaled).spec.n_scale_genes == 0


# ---- the ps_dfs orchestration helpers of vlmerge.run ----


def test_ps_stage_search_settings_and_refusals():
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["merge=ps_dfs", "search.budget=9", "merge.ps.popsize=3"])
        fixed = compose("config", overrides=["merge=dfs", "search=fixed", "search.recipes=[r.yaml]"])
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert {k: ps_stage_search(plain)[k] for k in ("budget", "popsize", "sigma0")} == {
        "budget": 9, "popsize": 3, "sigma0": pytest.approx(1 / 6)}
    plain["merge"]["ps"]["budgett"] = 3
    with pytest.raises(VlmergeError, match=r"merge.ps: unknown key\(s\) \['budgett'\]"):
        ps_stage_search(plain)
    with pytest.raises(VlmergeError, match="search=fixed re-scores PS recipes"):
        run(fixed)


def test_a_resumed_dfs_stage_keeps_its_tower_a(tmp_path):
    first, other = (Recipe.from_dict({"op": "ties", "sources": ["target", "ja"], "rules": [{"weight": w}]})
                    for w in (0.5, 0.6))  # fmt: skip
    keep_tower_a(tmp_path, first)
    keep_tower_a(tmp_path, other)  # nothing searched yet: the new A is kept
    assert Recipe.from_yaml((tmp_path / "tower_a.yaml").read_text()) == other
    (tmp_path / "trials.jsonl").write_text('{"trial": 0}\n')
    keep_tower_a(tmp_path, other)
    with pytest.raises(VlmergeError, match="the DFS stage was searched over the PS recipe in .*tower_a.yaml"):
        keep_tower_a(tmp_path, first)
