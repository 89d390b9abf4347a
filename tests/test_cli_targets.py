"""A config's `_target_`s: one that names no class or function is refused in one line naming its key, before the
command builds anything (no run dir left); arguments a target does not take are one line too (for a `_partial_`
node, also before anything runs), and so is a search target that is not a class. An error raised inside a
constructor is not the config's: a VlmergeError says its own message, a bug keeps Hydra's report of it."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.test_cli_errors import ENV, cli, one_error_line
from vlmerge.cli import config_dir, config_options
from vlmerge.errors import VlmergeError
from vlmerge.hydra_errors import TARGET_FIX, bad_partial_arguments, bad_target, instantiation_error_line

PROBE = """
from vlmerge.errors import VlmergeError


class Refuses:
    def __init__(self, **kwargs):
        raise VlmergeError("probe: refused")


class Buggy:
    def __init__(self, **kwargs):
        raise TypeError("probe bug")
"""


class Buggy:  # a target whose constructor has a bug
    def __init__(self, x=0):
        raise TypeError("a bug inside the constructor")


@pytest.mark.parametrize(
    ("command", "args", "line"),
    [
        ("vlmerge", ["search._target_=nosuch.Module"],
         f"search._target_ = 'nosuch.Module': there is no module 'nosuch'; {TARGET_FIX}"),
        ("vlmerge", ["merge.genome._target_=vlmerge.merge.genome.Genom"],
         "merge.genome._target_ = 'vlmerge.merge.genome.Genom': 'vlmerge.merge.genome' has no 'Genom'; "
         "did you mean 'vlmerge.merge.genome.Genome'?"),
        ("vlmerge-eval", ["task=toy_math_ja", "task._target_=vlmerge.eval.tsk.Task"],
         "task._target_ = 'vlmerge.eval.tsk.Task': 'vlmerge.eval' has no 'tsk'; "
         "did you mean 'vlmerge.eval.task.Task'?"),
        ("vlmerge-merge", ["pool=toy_math", "pool._target_=vlmerge.models.pool"],
         f"pool._target_ = 'vlmerge.models.pool': names a module, not a class or function; {TARGET_FIX}"),
    ],
)  # fmt: skip
def test_a_target_that_names_nothing_is_one_line_naming_its_key(tmp_path, command, args, line):
    assert one_error_line(cli(command, *args, cwd=tmp_path)) == f"error: {line}"
    assert list(tmp_path.iterdir()) == []  # the run dir Hydra made is gone


def test_arguments_a_target_does_not_take_are_one_line_naming_its_key(tmp_path):
    line = one_error_line(cli("vlmerge", "+search.foo=1", cwd=tmp_path))
    assert line == ("error: search: CMAESSearch.__init__() got an unexpected keyword argument 'foo'; "
                    "the keys beside _target_ are the arguments of vlmerge.search.loop.CMAESSearch")  # fmt: skip
    assert list(tmp_path.iterdir()) == []
    full = cli("vlmerge", "+search.foo=1", cwd=tmp_path, env={**ENV, "HYDRA_FULL_ERROR": "1"})  # for developers
    assert full.returncode == 1 and "Traceback" in full.stderr and "InstantiationException" in full.stderr


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("+merge.path.foo=1", "merge.path: PathSpec.__init__() got an unexpected keyword argument 'foo'; "
                              "the keys beside _target_ are the arguments of vlmerge.dfs.path.PathSpec"),
        ("+merge.path_model.foo=1", "merge.path_model: PathModel.__init__() got an unexpected keyword argument "
                                    "'foo'; the keys beside _target_ are the arguments of vlmerge.dfs.model.PathModel"),
    ],
)  # fmt: skip
def test_arguments_a_partial_target_does_not_take_are_the_same_line_before_anything_runs(tmp_path, override, line):
    """merge.path and merge.path_model are `_partial_`: the command calls them with the towers' depths after the
    model loads, outside Hydra; their config's arguments are refused up front, as other nodes' are."""
    assert one_error_line(cli("vlmerge", "merge=dfs", override, cwd=tmp_path)) == f"error: {line}"
    assert list(tmp_path.iterdir()) == []


def test_bad_partial_arguments_checks_partial_nodes_only(monkeypatch):
    path = {"_target_": "vlmerge.dfs.path.PathSpec", "_partial_": True, "_convert_": "all", "repeats": 2}
    assert bad_partial_arguments({"merge": {"path": path}}) is None  # depth_a, depth_b come with the call
    assert bad_partial_arguments({"merge": {"path": {**path, "_partial_": False, "foo": 1}}}) is None  # Hydra's
    assert bad_partial_arguments({"m": [{**path, "foo": 1}]}) == (
        "m[0]: PathSpec.__init__() got an unexpected keyword argument 'foo'; "
        "the keys beside _target_ are the arguments of vlmerge.dfs.path.PathSpec"
    )
    joined = {"_target_": "os.path.join", "_partial_": True, "_args_": ["a"]}  # a function, positional arguments
    assert bad_partial_arguments({"j": joined}) is None
    assert bad_partial_arguments({"j": {**joined, "x": 1}}).startswith("j: join() got an unexpected keyword argument")
    with initialize_config_dir(config_dir(), version_base="1.3"):  # the shipped partial nodes take their keys
        for merge in config_options("merge"):
            assert bad_partial_arguments(compose("config", [f"merge={merge}"])) is None, merge
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    assert bad_partial_arguments({"m": [{**path, "foo": 1}]}) is None


@pytest.mark.parametrize("args", [[], ["experiment=toy_math_ja"]])  # merge=ps_dfs_compact, merge=ties_dare
def test_a_search_target_that_is_not_a_class_is_one_line_naming_its_key(tmp_path, args):
    line = one_error_line(cli("vlmerge", "search._target_=vlmerge.run.run", *args, cwd=tmp_path))
    assert line == ("error: search._target_ = 'vlmerge.run.run' names a function, not a class; set it to a "
                    "searcher class (vlmerge.search.loop.CMAESSearch, as search=cmaes does, or "
                    "vlmerge.search.fixed.FixedSearch, as search=fixed does)")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_a_constructors_own_errors_are_not_the_configs(tmp_path):
    (tmp_path / "probe_targets.py").write_text(PROBE)  # importable: `python -m` runs with the cwd on sys.path
    run_dir = tmp_path / "run"
    refused = cli("vlmerge", "search._target_=probe_targets.Refuses", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert one_error_line(refused) == "error: probe: refused" and not run_dir.exists()
    bug = cli("vlmerge", "search._target_=probe_targets.Buggy", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert bug.returncode == 1 and "TypeError('probe bug')" in bug.stderr, bug.stderr[-3000:]
    assert "error: " not in bug.stderr and run_dir.is_dir()  # a bug is not bad input: Hydra reports it, all kept


def test_bad_target_names_the_key_of_any_target_in_the_config():
    good = {"_target_": "vlmerge.merge.genome.Genome", "op": "linear"}
    assert bad_target({"merge": {"genome": good}, "x": [1, {"y": 2}]}) is None
    assert bad_target({"a": [good, {"b": {"_target_": "vlmerge.nosuch.X"}}]}) == (
        "a[1].b._target_ = 'vlmerge.nosuch.X': 'vlmerge' has no 'nosuch'; " + TARGET_FIX
    )
    assert bad_target({"_target_": "vlmerge.eval.task.Task.nope"}) == (
        "_target_ = 'vlmerge.eval.task.Task.nope': 'vlmerge.eval.task.Task' has no 'nope'; " + TARGET_FIX
    )
    assert bad_target({"s": {"_target_": 3}}) == f"s._target_ = 3: not a dotted path; {TARGET_FIX}"
    assert bad_target({"s": {"_target_": ".a.B"}}) == f"s._target_ = '.a.B': not a dotted path; {TARGET_FIX}"
    cfg = OmegaConf.create({"name": "vlmerge.eval.tsk.Task", "task": {"_target_": "${name}"}})  # resolved
    assert bad_target(cfg).startswith("task._target_ = 'vlmerge.eval.tsk.Task': 'vlmerge.eval' has no 'tsk'")
    unresolved = OmegaConf.create({"task": {"_target_": "${nosuch}"}, "other": {"_target_": "nosuch.X"}})
    assert bad_target(unresolved).startswith("other._target_")  # left to where it is used


def test_a_module_that_exists_but_fails_to_import_is_not_a_config_mistake(tmp_path, monkeypatch):
    (tmp_path / "broken_probe.py").write_text("import nosuch_dependency_of_the_probe\n\n\nclass Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="nosuch_dependency_of_the_probe"):  # Hydra's error, its traceback
        bad_target({"search": {"_target_": "broken_probe.Thing"}})


def test_instantiation_error_line_is_the_configs_mistakes_only(monkeypatch):
    cfg = {"merge": {"genome": {"_target_": "vlmerge.merge.genome.Genome", "op": "linear", "foo": 1}}}
    with pytest.raises(InstantiationException) as wrong_arguments:
        instantiate(cfg["merge"]["genome"])  # a plain node: Hydra's message has no key, the config's match has
    assert instantiation_error_line(wrong_arguments.value, cfg) == (
        "merge.genome: Genome.__init__() got an unexpected keyword argument 'foo'; "
        "the keys beside _target_ are the arguments of vlmerge.merge.genome.Genome"
    )
    with pytest.raises(InstantiationException) as bug:
        instantiate({"_target_": f"{__name__}.Buggy"})
    assert instantiation_error_line(bug.value, {}) is None
    assert instantiation_error_line(VlmergeError("x"), cfg) is None
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    assert instantiation_error_line(wrong_arguments.value, cfg) is None
