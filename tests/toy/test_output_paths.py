"""The toy commands refuse an output path that is (or lies under) a file, before writing or replacing anything."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vlmerge.errors import VlmergeError
from vlmerge.toy import build, seeds
from vlmerge.toy.splits import EvalSetConfig, write_eval_sets

SMALL = EvalSetConfig(seed=2, vqa_search_size=4, vqa_heldout_size=4, math_search_size=4, math_heldout_size=4,
                      canvas=24)


def tree(folder) -> dict:
    """Every path under `folder`, hidden ones too, with each file's bytes (None for a folder)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def module_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300)


def test_eval_sets_check_every_folder_before_replacing_the_first(tmp_path):
    (tmp_path / "toy_vqa_ja").mkdir()
    (tmp_path / "toy_vqa_ja" / "search.jsonl").write_text("old\n")
    (tmp_path / "toy_math_ja").write_text("user file")
    before = tree(tmp_path)
    with pytest.raises(VlmergeError) as err:
        write_eval_sets(tmp_path, SMALL)
    assert str(err.value) == f"output dir {tmp_path / 'toy_math_ja'} exists and is not a directory; choose another path"
    assert tree(tmp_path) == before  # the old VQA set untouched, no hidden staging folder


@pytest.mark.parametrize("module", ["vlmerge.toy.splits", "vlmerge.toy.seeds"])
def test_cli_out_that_is_a_file_is_one_error(tmp_path, module):
    user = tmp_path / "userfile.txt"
    user.write_text("keep me")
    done = module_cli(module, "--out", str(user))
    assert done.returncode == 2
    assert done.stderr.count("error:") == 1 and "Traceback" not in done.stderr
    assert f"{user} exists and is not a directory" in done.stderr
    assert tree(tmp_path) == {"userfile.txt": b"keep me"}


def test_seeds_refuses_a_run_folder_that_is_a_file_before_any_run(tmp_path):
    run = seeds.run_dir(tmp_path, "toy_math_ja", "ps", 0)
    run.write_text("user file")
    with pytest.raises(VlmergeError, match=f"--out {tmp_path}: {run} exists and is not a directory"):
        seeds.main(["--out", str(tmp_path), "--experiments", "toy_math_ja", "--seeds", "0"])
    assert tree(tmp_path) == {run.name: b"user file"}


def test_build_refuses_an_out_file_before_building(tmp_path, monkeypatch):
    user = tmp_path / "userfile.txt"
    user.write_text("keep me")

    def no_build(*args, **kwargs):
        raise AssertionError("built before --out was checked")

    monkeypatch.setattr(build, "build_models", no_build)
    with pytest.raises(VlmergeError, match=f"output dir {user} exists and is not a directory"):
        build.main(["--out", str(user), "--quiet"])
    with pytest.raises(VlmergeError, match=f"output dir {user} exists and is not a directory"):
        build.save_models({}, user)  # refused before anything of `built` is read or written
    assert tree(tmp_path) == {"userfile.txt": b"keep me"}
