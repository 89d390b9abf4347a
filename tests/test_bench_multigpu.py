"""bench/bench_multigpu.py (the multi-GPU figures in bench/README.md) on tiny shapes: the same code on the CPU,
one in-process worker and two Ray actors."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_multigpu.py"


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_tiny_generation_on_one_and_two_workers(tmp_path):
    pytest.importorskip("ray")
    root = tmp_path / "bench"
    done = run_bench("--tiny", "--workers", "1,2", "--popsize", "4", "--items", "8", "--new-tokens", "4",
                     "--repeats", "2", "--root", str(root))
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout.strip().splitlines()
    assert "popsize 4, 8 VQA items, 4 new tokens" in table[-4] and "median of 2" in table[-4]
    rows = [line.split() for line in table[-2:]]
    assert [row[0] for row in rows] == ["1", "2"]
    assert rows[0][3] == "1.00" and float(rows[1][1]) > 0 and float(rows[1][4]) == 1.6
    assert (root / "target" / "config.json").is_file() and len(list((root / "items" / "images").iterdir())) == 8


def test_refuses_to_delete_a_folder_it_did_not_make(tmp_path):
    keep = tmp_path / "mine.txt"
    keep.write_text("data")
    done = run_bench("--tiny", "--workers", "1", "--root", str(tmp_path))
    assert done.returncode != 0 and "was not made by this script" in done.stderr
    assert keep.read_text() == "data"


@pytest.mark.parametrize("args, message", [(["--workers", "1,x"], "--workers '1,x'"),
                                           (["--repeats", "0"], "at least 1")])
def test_bad_arguments_exit_with_one_message(tmp_path, args, message):
    done = run_bench("--tiny", "--root", str(tmp_path / "new"), *args)
    assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "new").exists()
