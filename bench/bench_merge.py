"""`vlmerge-merge` vs `mergekit-yaml` on one TIES merge of three ~51M-parameter Mistral fine-tunes.

Builds (in a temp dir) a random 6-layer Mistral base (vocab 32000, hidden 512, MLP 1536, 50.9M parameters)
with a 32000-token tokenizer, and three fine-tunes (base + seeded noise), fp32 by default. Both tools then
run the SAME mergekit YAML as whole processes, interleaved (the order alternates every repeat); each run is
measured from a fresh wrapper process: wall time and peak RSS of the tool's process (RUSAGE_CHILDREN).
The two outputs are compared tensor by tensor once. The table comes last.

    python bench/bench_merge.py [--reps 3] [--dtype float32|bfloat16] [--device cpu|cuda] [--profile]

Both tools run as `python -c "<console-script entry>()"` (what their console scripts do), so the bench also
runs where they are importable but not installed (PYTHONPATH). --profile adds one cProfile run of vlmerge.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
              tie_word_embeddings=False)  # fmt: skip
ENTRY = {"vlmerge": "from vlmerge.cli import merge_main; merge_main()",
         "mergekit": "from mergekit.scripts.run_yaml import main; main()"}  # fmt: skip
MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - start
peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": done.returncode, "wall_s": wall, "peak_mb": peak_kb / 1024,
                  "err": done.stderr[-2000:]}))
"""
PROFILE = """
import cProfile, pstats, sys
from vlmerge.cli import merge_main
sys.argv = ["vlmerge-merge", *sys.argv[1:]]
profile = cProfile.Profile()
try:
    profile.runcall(merge_main)
except SystemExit:
    pass
pstats.Stats(profile).sort_stats("tottime").print_stats(18)
"""


def build_models(root: Path, dtype: torch.dtype) -> dict[str, Path]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(CONFIG["vocab_size"] - 3)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")  # fmt: skip
    base = root / "base"
    model = MistralForCausalLM(MistralConfig(**CONFIG, bos_token_id=1, eos_token_id=2)).to(dtype)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    params = sum(p.numel() for p in model.parameters())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    paths = {"base": base}
    for i in (1, 2, 3):
        folder = root / f"ft{i}"
        shutil.copytree(base, folder, ignore=shutil.ignore_patterns("*.safetensors"))
        gen = torch.Generator().manual_seed(i)
        moved = {k: (v.float() + 0.02 * torch.randn(v.shape, generator=gen)).to(dtype)
                 for k, v in state.items()}  # fmt: skip
        save_file(moved, str(folder / "model.safetensors"), metadata={"format": "pt"})
        paths[f"ft{i}"] = folder
    print(f"models: base + 3 fine-tunes, {params / 1e6:.1f}M parameters each, {dtype}, in {root}")
    return paths


def ties_yaml(paths: dict[str, Path], dtype: str) -> dict:
    weights = {"ft1": (0.5, 0.5), "ft2": (0.3, 0.7), "ft3": (0.4, 0.3)}
    return {"merge_method": "ties", "base_model": str(paths["base"]), "dtype": dtype,
            "parameters": {"normalize": True},
            "models": [{"model": str(paths[n]), "parameters": {"weight": w, "density": d}}
                       for n, (w, d) in weights.items()]}  # fmt: skip


def arguments(recipe: Path, out: Path, device: str) -> dict[str, list[str]]:
    mergekit = [str(recipe), str(out), "--lazy-unpickle", "--quiet"]
    mergekit += ["--cuda"] if device == "cuda" else []
    return {"vlmerge": [f"recipe={recipe}", f"output_dir={out}", f"device={device}"], "mergekit": mergekit}


def run(command: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True,
                          check=True)  # fmt: skip
    result = json.loads(done.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"{command[0]} failed (exit {result['rc']}):\n{result['err']}")
    return result


def difference(a: Path, b: Path) -> str:
    def load(folder: Path) -> dict[str, torch.Tensor]:
        state = {}
        for file in sorted(folder.glob("*.safetensors")):
            state.update(load_file(file))
        return state

    ours, theirs = load(a), load(b)
    if sorted(ours) != sorted(theirs):
        raise SystemExit(f"outputs hold different tensors: {sorted(set(ours) ^ set(theirs))[:5]}")
    diffs = [(ours[k].float() - theirs[k].float()).abs() for k in ours]
    worst = max(d.max().item() for d in diffs)
    differing = sum(int((d > 1e-5).sum()) for d in diffs)
    return f"max |vlmerge - mergekit| {worst:.3g}; entries differing by > 1e-5: {differing}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one vlmerge run")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build models (default: /tmp)")
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    root = Path(tempfile.mkdtemp(prefix="bench_merge_", dir=args.workdir))
    try:
        paths = build_models(root / "models", getattr(torch, args.dtype))
        recipe = root / "ties.yaml"
        recipe.write_text(yaml.safe_dump(ties_yaml(paths, args.dtype)))
        results: dict[str, list[dict]] = {"vlmerge": [], "mergekit": []}
        for rep in range(args.reps):
            order = ["vlmerge", "mergekit"] if rep % 2 == 0 else ["mergekit", "vlmerge"]
            for tool in order:
                out = root / f"out_{tool}"
                shutil.rmtree(out, ignore_errors=True)
                command = [sys.executable, "-c", ENTRY[tool], *arguments(recipe, out, args.device)[tool]]
                results[tool].append(run(command))
                print(f"rep {rep} {tool:8s} wall {results[tool][-1]['wall_s']:6.2f} s  "
                      f"peak RSS {results[tool][-1]['peak_mb']:7.0f} MB", flush=True)  # fmt: skip
            if rep == 0:
                print(difference(root / "out_vlmerge", root / "out_mergekit"), flush=True)
        if args.profile:
            out = root / "out_profile"
            subprocess.run([sys.executable, "-c", PROFILE, *arguments(recipe, out, args.device)["vlmerge"]],
                           check=True)  # fmt: skip
        print_table(results, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what would fail only after the models are built: one line naming the option (argparse's exit 2)."""
    if args.reps < 1:
        parser.error(f"--reps {args.reps}: must be at least 1")
    if args.workdir is not None and not args.workdir.is_dir():
        parser.error(f"--workdir {args.workdir}: not an existing folder")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu")
    if importlib.util.find_spec("mergekit") is None:
        parser.error("mergekit is not importable (the bench compares against it): pip install mergekit==0.1.5")


def print_table(results: dict[str, list[dict]], args) -> None:
    wall = {t: statistics.median(r["wall_s"] for r in rs) for t, rs in results.items()}
    peak = {t: statistics.median(r["peak_mb"] for r in rs) for t, rs in results.items()}
    print(f"\nTIES, 3 x 50.9M-param Mistral + base, {args.dtype}, device {args.device}, "
          f"median of {args.reps} interleaved runs (whole process)")  # fmt: skip
    print(f"{'tool':10s} {'wall s':>8s} {'min..max':>14s} {'peak RSS MB':>12s}")
    for tool, rs in results.items():
        walls = [r["wall_s"] for r in rs]
        print(f"{tool:10s} {wall[tool]:8.2f} {min(walls):6.2f}..{max(walls):<6.2f} {peak[tool]:12.0f}")
    print(f"speed-up mergekit/vlmerge: {wall['mergekit'] / wall['vlmerge']:.2f}x   "
          f"peak RSS vlmerge/mergekit: {peak['vlmerge'] / peak['mergekit']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
