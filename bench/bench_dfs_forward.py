"""DFS path model forward against the exported model of the same depth, CPU, fp32.

    python bench/bench_dfs_forward.py [--hidden 512] [--layers 8] [--positions 12] [--batch 4] [--seq 256]
                                      [--reps 7] [--threads 1]

Builds (in a temp dir) a random Mistral A (vocab 8000, `--layers` layers) and a donor B (A + seeded noise),
a path of `--positions` layers mixing both towers with non-unit scalings (so every position but the first
carries the fold wrappers), runs it with PathModel (views over the resident weights) and exports it; the
exported model is an ordinary MistralForCausalLM with `--positions` layers. Forward passes of the two are
interleaved, `--reps` times after one warm-up each; the table gives the medians and their ratio, and checks
the logits agree. A second row does the same for tower A's identity path against A itself (the cost of views
alone). A script, not a test: the numbers depend on the machine.

Measured 2026-11 on the 2-core CI-like box (shared, noisy), default sizes (32.3M parameters, 12 positions,
batch 4 x 256): path 1017.5 ms vs exported 1017.5 ms, ratio 1.000 (max |logit diff| 1.8e-6); identity path
vs A 0.991; batch 1 x 16 tokens: ratio 0.967 / 0.937 (noise level); apply(path) 0.5-0.6 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vlmerge.dfs.export import export_path  # noqa: E402
from vlmerge.dfs.model import PathModel  # noqa: E402
from vlmerge.dfs.path import LayerPath  # noqa: E402


def build(root: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=8000, hidden_size=hidden, intermediate_size=3 * hidden,
                           num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                           max_position_embeddings=4096, tie_word_embeddings=False)  # fmt: skip
    a, b = root / "a", root / "b"
    MistralForCausalLM(config).save_pretrained(a)
    MistralForCausalLM(config).save_pretrained(b)
    gen = torch.Generator().manual_seed(1)
    state = load_file(a / "model.safetensors")
    moved = {k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    save_file(moved, str(b / "model.safetensors"), metadata={"format": "pt"})
    return a, b


def mixed_path(depth: int, positions: int) -> LayerPath:
    """A's and B's layers alternating in runs, scalings in [0.5, 2]: every fold wrapper is active."""
    gen = torch.Generator().manual_seed(2)
    layers = [(k * depth // positions) + (depth if k % 3 == 1 else 0) for k in range(positions)]
    scales = (0.5 + 1.5 * torch.rand(positions - 1, generator=gen)).tolist()
    return LayerPath(tuple(layers), tuple(scales), depth, depth)


def timed(model, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    return time.perf_counter() - start, out


def compare(label: str, run_path, run_plain, ids: torch.Tensor, reps: int) -> None:
    run_path(ids), run_plain(ids)  # warm-up
    path_s, plain_s = [], []
    for _ in range(reps):
        t, path_out = run_path(ids)
        path_s.append(t)
        t, plain_out = run_plain(ids)
        plain_s.append(t)
    p, q = statistics.median(path_s), statistics.median(plain_s)
    diff = (path_out - plain_out).abs().max().item()
    print(f"| {label:<34} | {p * 1e3:9.1f} | {q * 1e3:10.1f} | {p / q:5.3f} | {diff:12.1e} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in (("hidden", 512), ("layers", 8), ("positions", 12), ("batch", 4), ("seq", 256),
                          ("reps", 7), ("threads", 1)):  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    for name in ("hidden", "layers", "positions", "batch", "seq", "reps", "threads"):  # before any model is built
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.hidden % 16:
        parser.error(f"--hidden {args.hidden}: must be a multiple of 16 (8 attention heads of an even size)")
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        a, b = build(Path(tmp), args.hidden, args.layers)
        model = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32).eval()
        plain_a = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32).eval()
        path_model = PathModel(model, b)
        path = mixed_path(args.layers, args.positions)
        exported = AutoModelForCausalLM.from_pretrained(
            export_path(path_model, path, Path(tmp) / "exported", target=a), dtype=torch.float32
        ).eval()
        ids = torch.randint(3, 8000, (args.batch, args.seq), generator=torch.Generator().manual_seed(3))
        params = sum(p.numel() for p in plain_a.parameters()) / 1e6
        print(f"A, B: Mistral hidden {args.hidden}, {args.layers} layers, {params:.1f}M parameters; batch "
              f"{args.batch} x {args.seq} tokens, {args.threads} thread(s), fp32, median of {args.reps}")
        print(f"path ({args.positions} positions): {path.describe()}\n")
        print("| case                               | path (ms) | plain (ms) | ratio | max abs diff |")
        print("|------------------------------------|-----------|------------|-------|--------------|")

        def run_installed(p):
            def run(x):
                path_model.apply(p)  # not timed: a search installs once per candidate, then runs many batches
                return timed(model, x)
            return run

        compare(f"mixed path vs exported ({args.positions} layers)", run_installed(path),
                lambda x: timed(exported, x), ids, args.reps)  # fmt: skip
        identity = LayerPath.identity(args.layers, args.layers)
        compare(f"identity path vs A ({args.layers} layers)", run_installed(identity),
                lambda x: timed(plain_a, x), ids, args.reps)  # fmt: skip
        start = time.perf_counter()
        for _ in range(100):
            path_model.apply(path)
        path_model.reset()
        apply_ms = (time.perf_counter() - start) * 10
        print(f"\napply(path), building the views of {args.positions} positions: {apply_ms:.2f} ms")


if __name__ == "__main__":
    main()
