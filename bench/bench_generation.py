"""Items per second of batched generation against one item at a time, on a tiny random VLM (CPU by default).

    python bench/bench_generation.py [--family llava|llava_next|composite] [--items 64] [--batch 16]
                                     [--max-new-tokens 16] [--threads 1] [--device cpu]

Builds the model with the test fixtures in a temporary folder (nothing is downloaded), checks that batched
greedy outputs equal the one-at-a-time outputs, and prints a short table with the speed-up. A script, not a
test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fixtures.composite import make_composite  # noqa: E402
from tests.fixtures.hf_models import make_base_lm, make_llava  # noqa: E402
from vlmerge.errors import VlmergeError  # noqa: E402
from vlmerge.eval.generate import GenerationSettings, generate  # noqa: E402
from vlmerge.eval.loading import check_device, load_model  # noqa: E402
from vlmerge.models.source import ModelRef  # noqa: E402

WORDS = "what colour is the circle square triangle red green blue how many are there left right top".split()


def build(family: str, root: Path) -> Path:
    base = make_base_lm(root / "base")
    if family == "composite":
        return make_composite(root / "vlm", language_model_dir=base, seed=1)
    return make_llava(root / "vlm", base, next_=family == "llava_next")


def workload(n: int, image_token: str, seed: int = 0) -> tuple[list[str], list[Image.Image]]:
    """Questions of varied length (so batches need padding) and noise images, seeded."""
    rng = np.random.default_rng(seed)
    prompts = [
        f"{image_token}\nQ: {' '.join(rng.choice(WORDS, size=int(rng.integers(2, 12))))} ? A:"
        for _ in range(n)
    ]
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    return prompts, images


def timed(bundle, prompts, images, settings) -> tuple[list[str], float]:
    start = time.perf_counter()
    outputs = generate(bundle, prompts, images, settings)
    return outputs, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llava", choices=["llava", "llava_next", "composite"])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for name in ("items", "batch", "max_new_tokens", "threads"):  # before the model is built
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    try:
        check_device(args.device)
    except VlmergeError as err:
        parser.error(f"--device {args.device}: {err}")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="vlmerge-bench-") as tmp:
        folder = build(args.family, Path(tmp))
        bundle = load_model(ModelRef(str(folder), dtype="float32", device=args.device))
        prompts, images = workload(args.items, bundle.image_token)
        timed(bundle, prompts[:2], images[:2], GenerationSettings(max_new_tokens=2))  # warm-up
        rows = []
        outputs = {}
        for batch in (1, args.batch):
            settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=batch)
            outputs[batch], seconds = timed(bundle, prompts, images, settings)
            rows.append((batch, seconds, args.items / seconds))
    same = outputs[1] == outputs[args.batch]
    print(f"\n{args.family}, {args.items} items, {args.max_new_tokens} new tokens, greedy, {args.device}, "
          f"{args.threads} thread(s)")  # fmt: skip
    print(f"{'batch':>6} {'seconds':>9} {'items/s':>9} {'ratio':>7}")
    for batch, seconds, rate in rows:
        print(f"{batch:>6} {seconds:>9.2f} {rate:>9.1f} {rate / rows[0][2]:>6.1f}x")
    print(f"batched outputs equal one-at-a-time outputs: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
