"""Multi-GPU population evaluation (issue "Multi-GPU population evaluation"): the wall time of one search
generation of P candidates with `search.workers` = 1, 2, 4 ... and the speed-up against one worker.

Models: 7B-shaped random checkpoints in bf16 written to --root (a LLaVA-1.6-Mistral-7B-shaped LLaVA-NeXT target,
Mistral-7B-shaped donor and base sharing its tower shapes); fitness: the toy VQA task config on 64 synthetic
items. `workers=1` is the search's in-process evaluator; with more, each worker is a Ray actor with its own models
on one GPU. Models are built before timing (as a search builds them once); the timed part is exactly what the
search does per generation (`make_workers(...).map`). NVLink multicast stays off (NCCL_NVLS_ENABLE=0 etc. as the
machine sets them; nothing here uses NCCL collectives).

    python bench/bench_multigpu.py --workers 1,2 --popsize 8          # GPUs
    python bench/bench_multigpu.py --tiny --workers 1,2 --popsize 4   # smoke test of the same code (GPUs or CPU)
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

VISION_7B = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=336, patch_size=14, projection_dim=768)  # fmt: skip
TEXT_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, max_position_embeddings=4096, vocab_size=32064)  # fmt: skip
VISION_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                   patch_size=8, projection_dim=32)  # fmt: skip
TEXT_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, vocab_size=96)  # fmt: skip
WORDS = "<unk> <s> </s> <pad> <image> what colour is the shape how many are there ? 赤 青 です".split()


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens=["<image>"])  # fmt: skip


def build_models(root: Path, tiny: bool, device: str) -> None:
    """target (LLaVA-NeXT), base and donor (Mistral) with the same tokenizer; base/donor = target tower + noise."""
    from safetensors.torch import save_file
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        MistralConfig,
    )

    vision, text = (VISION_TINY, TEXT_TINY) if tiny else (VISION_7B, TEXT_7B)
    size = vision["image_size"]
    pinpoints = [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
    tok = tokenizer()
    config = LlavaNextConfig(text_config=MistralConfig(**text).to_dict(), vision_config=vision,
                             image_token_index=WORDS.index("<image>"), image_grid_pinpoints=pinpoints)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        torch.set_default_dtype(torch.bfloat16)
        model = LlavaNextForConditionalGeneration(config).eval()
        torch.set_default_dtype(torch.float32)
    model.generation_config.pad_token_id = WORDS.index("<pad>")
    model.save_pretrained(root / "target", max_shard_size="5GB")
    image_processor = LlavaNextImageProcessor(image_grid_pinpoints=pinpoints, size={"shortest_edge": size},
                                              crop_size={"height": size, "width": size})  # fmt: skip
    LlavaNextProcessor(image_processor, tok, patch_size=vision["patch_size"], vision_feature_select_strategy="default",
                       num_additional_image_tokens=1).save_pretrained(root / "target")  # fmt: skip
    tower = {("model." + k if not k.startswith("lm_head") else k): v
             for k, v in model.model.language_model.state_dict().items()}  # fmt: skip
    tower["lm_head.weight"] = model.lm_head.weight.detach()
    del model
    gen = torch.Generator(device=device).manual_seed(1)
    for name, noise in (("base", 0.0), ("donor", 1e-3)):
        folder = root / name
        folder.mkdir()
        MistralConfig(**text, dtype="bfloat16", architectures=["MistralForCausalLM"]).save_pretrained(folder)
        tok.save_pretrained(folder)
        shard, files, weight_map = {}, [], {}
        for key, value in tower.items():
            noisy = value + noise * torch.randn(value.shape, device=device, generator=gen, dtype=value.dtype)
            shard[key] = (noisy if name == "donor" else value).detach().to("cpu").contiguous()
            if sum(t.numel() * 2 for t in shard.values()) > 4e9:
                files.append(shard)
                shard = {}
        files.append(shard)
        for i, part in enumerate(files, 1):
            file = f"model-{i:05d}-of-{len(files):05d}.safetensors"
            save_file(part, str(folder / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def write_items(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(folder / "search.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"images/{i}.png")
            f.write(json.dumps({"id": str(i), "image": f"images/{i}.png", "question": "what colour is the shape ?",
                                "answers": ["赤 です"]}) + "\n")  # fmt: skip


def fitness_config(root: Path, device: str, new_tokens: int, batch: int) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vlmerge.cli import config_dir

    dtype = "float32" if device == "cpu" else "bfloat16"
    ref = {"dtype": dtype, "device": device}
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"pool.target.path={root / 'target'}", f"pool.donors.ja.path={root / 'donor'}",
            f"pool.base.path={root / 'base'}", f"task.data={root / 'items'}", f"task.max_new_tokens={new_tokens}",
            "task.stop=[]", f"task.batch_size={batch}", "merge.genome.groups=layer",
        ])  # fmt: skip
    plain = OmegaConf.to_container(cfg, resolve=True)
    for part in (plain["pool"]["target"], plain["pool"]["base"], plain["pool"]["donors"]["ja"]):
        part.update(ref)
    return plain


def time_generation(cfg: dict, workers: int, popsize: int, repeats: int) -> list[float]:
    """Seconds per generation, `repeats` generations (generation r draws its candidates with seed r)."""
    from hydra.utils import instantiate

    from vlmerge.candidates import FitnessFactory
    from vlmerge.search.fitness import Problem
    from vlmerge.search.workers import make_workers

    genome = instantiate(cfg["merge"]["genome"], _convert_="all")
    depth = json.loads((Path(cfg["pool"]["base"]["path"]) / "config.json").read_text())["num_hidden_layers"]
    x0 = genome.x0(depth, ("target", "ja"))
    problem = Problem(x0=x0, factory=FitnessFactory(cfg))
    pool = make_workers(problem, workers)  # builds every worker's models (not timed, as in a search)
    seconds, failed = [], []
    try:
        pool.map([x0] * workers, lambda i, o: None)  # warm-up: one candidate per worker
        for r in range(repeats):
            rng = np.random.default_rng(r)
            xs = [np.clip(x0 + rng.normal(0, 1 / 6, x0.shape), 0, 1) for _ in range(popsize)]
            start = time.perf_counter()
            pool.map(xs, lambda i, o: failed.append(o.error) if o.error else None)
            seconds.append(time.perf_counter() - start)
    finally:
        pool.close()
        del pool
        free_gpu_memory()  # the one-worker fitness lives in this process: hand its GPU memory back to the actors
    if failed:
        raise RuntimeError(f"candidates failed: {failed[:2]}")
    return seconds


def free_gpu_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--popsize", type=int, default=8)
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per worker count (median shown)")
    parser.add_argument("--root", type=Path, default=Path("/tmp/vlmerge_bench_multigpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke test of the code; CPU if no GPU)")
    args = parser.parse_args(argv)
    try:
        counts = [int(n) for n in args.workers.split(",")]
    except ValueError:
        raise SystemExit(f"--workers {args.workers!r}: give worker counts such as 1,2,4") from None
    if min(counts) < 1:
        raise SystemExit(f"--workers {args.workers}: every worker count must be at least 1")
    for name in ("popsize", "items", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        raise SystemExit("7B shapes need GPUs (none visible); --tiny runs the same code on the CPU")
    if device == "cuda" and max(counts) > torch.cuda.device_count():
        raise SystemExit(f"--workers {args.workers} needs {max(counts)} GPUs; {torch.cuda.device_count()} visible")
    if max(counts) > 1 and importlib.util.find_spec("ray") is None:
        raise SystemExit(f"--workers {args.workers}: more than one worker needs ray (pip install 'ray>=2.9')")
    marker = args.root / ".vlmerge_bench_multigpu"  # only a folder this script made is ever deleted
    if args.root.exists() and (not args.root.is_dir() or any(args.root.iterdir()) and not marker.is_file()):
        raise SystemExit(f"--root {args.root} exists and was not made by this script: name a new folder")
    shutil.rmtree(args.root, ignore_errors=True)
    args.root.mkdir(parents=True)
    marker.touch()
    start = time.perf_counter()
    build_models(args.root, args.tiny, device)
    free_gpu_memory()
    write_items(args.root / "items", args.items, (VISION_TINY if args.tiny else VISION_7B)["image_size"])
    print(f"models written in {time.perf_counter() - start:.0f} s", flush=True)
    cfg = fitness_config(args.root, device, args.new_tokens, args.items)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    times = {n: time_generation(cfg, n, args.popsize, args.repeats) for n in counts}
    median = {n: float(np.median(seconds)) for n, seconds in times.items()}
    name = (torch.cuda.get_device_name() if device == "cuda" else "CPU") + (" (tiny shapes)" if args.tiny else "")
    print(f"\none search generation, popsize {args.popsize}, {args.items} VQA items, {args.new_tokens} new tokens, "
          f"{name}; median of {args.repeats}")  # fmt: skip
    print(f"{'workers':>7} {'seconds':>8} {'range':>13} {'speed-up':>9} {'target':>7}")
    for n, seconds in times.items():
        spread = f"{min(seconds):.1f}..{max(seconds):.1f}"
        speed_up = median[counts[0]] * counts[0] / median[n]
        print(f"{n:>7} {median[n]:8.1f} {spread:>13} {speed_up:9.2f} {0.8 * n:7.1f}")


if __name__ == "__main__":
    main()
