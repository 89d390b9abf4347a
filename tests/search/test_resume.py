"""Kill -9 and Ctrl-C/SIGTERM mid-generation, then resume: the same trials and best as a straight run."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.search.sphere_run import POPSIZE, problem, search
from vlmerge.search.checkpoint import CHECKPOINT, read_trials

REPO = Path(__file__).resolve().parents[2]
BUDGET = 40  # 6 full generations of 6 + a truncated one of 4


def straight_run(run_dir: Path) -> list[dict]:
    search(BUDGET, resume=False).run(problem(0.0), run_dir)
    return read_trials(run_dir)


def start(run_dir: Path, resume: bool) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "tests.search.sphere_run",
        str(run_dir),
        str(BUDGET),
        "0.04",
        "1" if resume else "0",
    ]
    # Ctrl-C reaches a search started from a terminal; a runner that launched the tests in the background may
    # have left SIGINT ignored, which the child would inherit, so give the child the terminal's default
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_mid_generation(run_dir: Path, proc: subprocess.Popen, min_generation: int = 1) -> None:
    """Return while a generation after the `min_generation`-th checkpoint is half evaluated."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / CHECKPOINT).exists():
            state = pickle.loads((run_dir / CHECKPOINT).read_bytes())
            lines = len(read_trials(run_dir))
            if (
                state["generation"] >= min_generation
                and state["evaluations"] + 2 <= lines < state["evaluations"] + 5
            ):
                return
        time.sleep(0.01)
    raise AssertionError(f"the search never reached the middle of a generation (exit {proc.poll()})")


def same_trials(a: list[dict], b: list[dict]) -> None:
    assert [(r["generation"], r["index"], r["x"], r["fitness"]) for r in a] == [
        (r["generation"], r["index"], r["x"], r["fitness"]) for r in b
    ]


def test_sigkill_mid_generation_then_resume_matches_a_straight_run(tmp_path):
    expected = straight_run(tmp_path / "straight")
    run_dir = tmp_path / "killed"
    proc = start(run_dir, resume=False)
    wait_mid_generation(run_dir, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    state = pickle.loads((run_dir / CHECKPOINT).read_bytes())
    at_kill = read_trials(run_dir)
    assert len(at_kill) > state["evaluations"]  # killed with a generation half done
    assert len(at_kill) < BUDGET

    fitness = problem(0.0)
    result = search(BUDGET, resume=True).run(fitness, run_dir)
    trials = read_trials(run_dir)
    same_trials(trials, expected)
    best = max((r for r in expected if r["fitness"] is not None), key=lambda r: r["fitness"])
    assert result.best_fitness == best["fitness"] and result.best_x.tolist() == best["x"]
    # the half generation's logged candidates were reused, the rest evaluated once
    assert fitness.fitness.calls == BUDGET - len(at_kill)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_exits_cleanly_and_resumes(tmp_path, signum):
    expected = straight_run(tmp_path / "straight")
    run_dir = tmp_path / "interrupted"
    proc = start(run_dir, resume=False)
    wait_mid_generation(run_dir, proc, min_generation=2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "resume=true" in err
    state = pickle.loads((run_dir / CHECKPOINT).read_bytes())
    assert state["evaluations"] == state["generation"] * POPSIZE and state["generation"] >= 2

    search(BUDGET, resume=True).run(problem(0.0), run_dir)
    same_trials(read_trials(run_dir), expected)
