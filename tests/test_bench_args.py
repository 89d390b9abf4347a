"""Bad arguments to the bench/ scripts end in one line naming the option and its value, before any model is built
(was: a traceback, some after minutes of work). Each script's `main(argv)` runs in this process; one run is a
whole process, to see the message as a user does."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
_LOADED = {}


def bench(name: str):
    """bench/<name>.py as a module (the scripts are not a package)."""
    if name not in _LOADED:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _LOADED[name] = module
    return _LOADED[name]


def refusal(name: str, argv: list[str], capsys) -> str:
    """The one-line message with which bench/<name>.py refuses `argv` (argparse's exit 2 or SystemExit(text))."""
    with pytest.raises(SystemExit) as exit_info:
        bench(name).main(argv)
    code, stderr = exit_info.value.code, capsys.readouterr().err
    if isinstance(code, str):
        message = code
    else:
        assert code == 2 and "Traceback" not in stderr
        message = stderr.strip().splitlines()[-1]
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("argv, culprit", [
    *[([f"--{name}", "0"], f"--{name} 0: must be at least 1")
      for name in ("hidden", "layers", "positions", "batch", "seq", "reps", "threads")],
    (["--layers", "-3"], "--layers -3: must be at least 1"),
    (["--hidden", "24"], "--hidden 24: must be a multiple of 16"),
])
def test_dfs_forward_refuses(argv, culprit, capsys):
    assert culprit in refusal("bench_dfs_forward", argv, capsys)


@pytest.mark.parametrize("argv, culprit", [
    (["--items", "0"], "--items 0: must be at least 1"),
    (["--batch", "-1"], "--batch -1: must be at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    (["--threads", "0"], "--threads 0: must be at least 1"),
    (["--device", "nowhere"], "--device nowhere: unknown device"),
])
def test_generation_refuses(argv, culprit, capsys):
    assert culprit in refusal("bench_generation", argv, capsys)


def test_generation_refuses_cuda_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--device cuda: " in refusal("bench_generation", ["--device", "cuda"], capsys)


def test_merge_refuses(tmp_path, capsys, monkeypatch):
    assert "--reps 0: must be at least 1" in refusal("bench_merge", ["--reps", "0"], capsys)
    missing = tmp_path / "missing"
    assert f"--workdir {missing}: not an existing folder" in refusal("bench_merge", ["--workdir", str(missing)],
                                                                        capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--device cuda: no CUDA device" in refusal("bench_merge", ["--device", "cuda"], capsys)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mergekit" else real(name, *a))
    assert "mergekit is not importable" in refusal("bench_merge", ["--workdir", str(tmp_path)], capsys)
    assert not list(tmp_path.iterdir())  # nothing made in the work folder


@pytest.mark.parametrize("argv, culprit", [
    (["--workers", "0,1"], "--workers 0,1: every worker count must be at least 1"),
    (["--popsize", "0"], "--popsize 0: must be at least 1"),
    (["--items", "-2"], "--items -2: must be at least 1"),
    (["--new-tokens", "0"], "--new-tokens 0: must be at least 1"),
    (["--repeats", "0"], "--repeats 0: must be at least 1"),
])
def test_multigpu_refuses(argv, culprit, tmp_path, capsys):
    root = tmp_path / "new"
    assert culprit in refusal("bench_multigpu", ["--tiny", "--workers", "1", "--root", str(root), *argv], capsys)
    assert not root.exists()


def test_multigpu_refuses_several_workers_without_ray(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    root = tmp_path / "new"
    message = refusal("bench_multigpu", ["--tiny", "--workers", "1,2", "--root", str(root)], capsys)
    assert "--workers 1,2: more than one worker needs ray" in message and not root.exists()


@pytest.mark.parametrize("argv, culprit", [
    (["--layers", "0"], "--layers 0: must be at least 1"),
    (["--batch", "0"], "--batch 0: must be at least 1"),
    (["--new-tokens", "-1"], "--new-tokens -1: must be at least 1"),
])
def test_resident_gpu_refuses(argv, culprit, capsys):
    assert culprit in refusal("bench_resident_gpu", argv, capsys)


def test_resident_gpu_refuses_to_start_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device is visible" in refusal("bench_resident_gpu", [], capsys)


def test_a_refusal_is_one_line_from_the_command_line():
    done = subprocess.run([sys.executable, str(BENCH / "bench_dfs_forward.py"), "--reps", "0"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1].endswith("error: --reps 0: must be at least 1")
