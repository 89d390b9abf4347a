"""The three commands' command-line mistakes: Hydra's own refusals (unknown key, unknown config group option,
an override that does not parse) end in one `error:` line and exit 2 as a VlmergeError does; a pool or a
held-out task that does not exist is named; a search refused on bad input leaves no run dir of its own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from vlmerge.cli import config_dir
from vlmerge.errors import VlmergeError

COMMANDS = {
    "vlmerge": [sys.executable, "-m", "vlmerge"],
    "vlmerge-merge": [sys.executable, "-c", "from vlmerge.cli import merge_main; merge_main()"],
    "vlmerge-eval": [sys.executable, "-c", "from vlmerge.cli import eval_main; eval_main()"],
}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def cli(command: str, *args: str, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*COMMANDS[command], *args], cwd=cwd, env=env or ENV, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("nosuchkey=1", ["'nosuchkey'", "+nosuchkey=1"]),
        ("seed=[1,", ["'seed=[1,'"]),  # does not parse
        ("pool=nosuch", ["'nosuch'", "'pool'", "toy_math, toy_vqa"]),  # a config group option
        ("hydra/launcher=nosuch", ["'nosuch'", "'hydra/launcher'", "basic"]),
    ],
)
def test_hydra_refusals_end_in_one_line(tmp_path, command, override, names):
    line = one_error_line(cli(command, override, cwd=tmp_path))
    assert all(name in line for name in names), line
    assert list(tmp_path.iterdir()) == []  # no run dir, no outputs/


@pytest.mark.parametrize(("override", "names"), [("experiment=nosuch", ["'nosuch'", "'experiment'", "toy_vqa_ja"]),
                                                 ("merge=nosuch", ["'nosuch'", "'merge'", "ties_dare"]),
                                                 ("merge.nosuch.x=1", ["'merge.nosuch.x'", "'merge.nosuch'"])])
def test_search_refusals_of_its_groups_end_in_one_line(tmp_path, override, names):
    line = one_error_line(cli("vlmerge", override, cwd=tmp_path))
    assert all(name in line for name in names), line


def test_hydra_flags_keep_working_and_refuse_in_one_line(tmp_path):
    shown = cli("vlmerge", "--cfg", "job", "seed=3", cwd=tmp_path)
    assert shown.returncode == 0 and "\nseed: 3\n" in shown.stdout, shown.stderr[-3000:]
    assert cli("vlmerge-eval", "--help", cwd=tmp_path).returncode == 0
    assert "'nosuch'" in one_error_line(cli("vlmerge", "--cfg", "job", "nosuch=1", cwd=tmp_path))
    assert "'nosuch'" in one_error_line(cli("vlmerge", "-m", "seed=0,1", "nosuch=1", cwd=tmp_path))
    assert list(tmp_path.iterdir()) == []
    full = cli("vlmerge", "nosuch=1", cwd=tmp_path, env={**ENV, "HYDRA_FULL_ERROR": "1"})  # for developers
    assert full.returncode == 1 and "Traceback" in full.stderr and "ConfigCompositionException" in full.stderr


def test_an_unknown_pool_is_refused_but_the_pool_may_be_left_out(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("op: linear\nsources: [target]\n")
    for command, args in (("vlmerge-merge", [f"recipe={recipe}", f"output_dir={tmp_path / 'out'}"]),
                          ("vlmerge-eval", [f"recipe={recipe}", "task=toy_math_ja"])):  # fmt: skip
        line = one_error_line(cli(command, *args, "pool=nosuch", cwd=tmp_path))
        assert "'nosuch'" in line and "'pool'" in line and "toy_math, toy_vqa" in line, line
        left_out = one_error_line(cli(command, *args, cwd=tmp_path))  # goes on to the recipe's own pool
        assert "names no models" in left_out, left_out
    with initialize_config_dir(config_dir(), version_base="1.3"):
        assert compose("merge_cli").get("pool") is None and compose("eval_cli").get("pool") is None
        assert compose("merge_cli", ["pool=toy_math"]).pool.target.path.endswith("toy_models/lm_ja")


def test_a_refused_search_removes_the_run_dir_hydra_made_for_it(tmp_path):
    run_dir = tmp_path / "new" / "nested" / "run"
    line = one_error_line(cli("vlmerge", "heldout_task=nosuch", f"hydra.run.dir={run_dir}", cwd=tmp_path))
    assert "heldout_task = 'nosuch'" in line and "mgsm_ja" in line, line
    assert list(tmp_path.iterdir()) == []  # no .hydra/, no cli.log, and the folders made for it are gone
    existing = tmp_path / "mine"  # a user's folder: never removed, whatever Hydra wrote in it
    (existing / "notes").mkdir(parents=True)
    one_error_line(cli("vlmerge", "heldout_task=nosuch", f"hydra.run.dir={existing}", cwd=tmp_path))
    assert (existing / "notes").is_dir() and (existing / ".hydra" / "config.yaml").is_file()
    sweep = tmp_path / "sweep"  # a sweep's job dirs are left as they are
    one_error_line(cli("vlmerge", "-m", "heldout_task=nosuch", "seed=0,1", f"hydra.sweep.dir={sweep}",
                       cwd=tmp_path))  # fmt: skip
    assert list(sweep.rglob("config.yaml"))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("mgsm_ja", "heldout_task = 'mgsm_ja' is a task's name, not its config: choose it with "
                    "+task@heldout_task=mgsm_ja"),
        ("nosuch", "heldout_task = 'nosuch': not a task; choose one with +task@heldout_task=NAME"),
        (3, "heldout_task = 3: not a task"),
    ],
)  # fmt: skip
def test_a_heldout_task_that_is_not_a_task_is_named(value, message):
    from vlmerge.candidates import checked_heldout_task

    with pytest.raises(VlmergeError) as refused:
        checked_heldout_task(value)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)
    if value != "mgsm_ja":
        assert "mgsm_ja" in str(refused.value) and "toy_vqa_ja" in str(refused.value)
    assert checked_heldout_task(None) is None and checked_heldout_task({"name": "x"}) == {"name": "x"}
