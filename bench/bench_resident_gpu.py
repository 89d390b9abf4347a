"""GPU benchmark (issue "Evolutionary search"): in-memory candidate merge vs the bandwidth floor, and generation
throughput of a resident 7B-shaped LLaVA-NeXT against plain HF generate at the same batch.

7B-shaped random tensors in bf16 (a LLaVA-1.6-Mistral-7B-shaped tower as the target, a Mistral-7B-shaped donor
and base): the task vectors are cached on the GPU as the search caches them, and each op writes the merged
tower into the resident parameters through `ResidentMerger.apply` (the code path the search runs).
Floor = bytes a candidate must move (read the base and every task vector, write the tower) / the copy
bandwidth measured in the same run (device-to-device copy of a 4 GiB buffer: 2 x 4 GiB moved).

After each op's timing, a few tensors are merged again through `merge_tensor` (the exporter's path) and must be
bitwise the resident result. `--profile` prints torch.profiler's table for one candidate of each op.

    python bench/bench_resident_gpu.py [--layers 32] [--skip-generation] [--profile]
"""

from __future__ import annotations

import argparse
import time

import torch

from vlmerge.merge.merger import TensorInputs, merge_tensor
from vlmerge.merge.recipe import Recipe
from vlmerge.merge.resident import ResidentMerger, cache_tensor
from vlmerge.models.plan import TensorPlan
from vlmerge.models.towers import layer_of, module_kind

HIDDEN, INTER, HEADS, KV, VOCAB_LLM, VOCAB_VLM = 4096, 14336, 32, 8, 32000, 32064


def tower_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    head = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB_VLM, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (KV * head, HIDDEN),
            p + "self_attn.v_proj.weight": (KV * head, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER), p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        })  # fmt: skip
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB_VLM, HIDDEN)})
    return shapes


def build_merger(layers: int, ops: tuple[str, ...]) -> tuple[ResidentMerger, int]:
    """Target param + cached base and 2 task vectors per tensor, on the GPU in bf16; returns (merger, floor bytes)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    entries, floor = [], 0
    for name, shape in tower_shapes(layers).items():
        rows = VOCAB_LLM if shape[0] == VOCAB_VLM else None
        shared = (rows, *shape[1:]) if rows else shape
        param = torch.nn.Parameter(torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02,
                                   requires_grad=False)  # fmt: skip
        base = torch.randn(shared, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        deltas = torch.randn((2, *shared), device="cuda", dtype=torch.bfloat16, generator=gen) * 1e-3
        plan = TensorPlan(name=name, target_key=name, source_keys=(name, name), base_key=name, layer=layer_of(name),
                          kind=module_kind(name), shape=shape, rows=rows)  # fmt: skip
        entries.append(cache_tensor(plan, param, TensorInputs(base=base, deltas=deltas), ops))
        floor += base.numel() * 2 * (1 + 2 + 1)  # read base + 2 deltas, write the merged rows
    return ResidentMerger(entries, ("target", "ja")), floor


def copy_bandwidth() -> float:
    src = torch.empty(2**31, dtype=torch.bfloat16, device="cuda")  # 4 GiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    return nbytes / best


def time_apply(merger: ResidentMerger, recipe: Recipe, repeats: int = 5) -> float:
    merger.apply(recipe)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        merger.apply(recipe)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def same_as_exporter(merger: ResidentMerger, recipe: Recipe) -> bool:
    """The resident tensors == merge_tensor's (the exporter's) for the embedding, one MLP matrix and one norm."""
    picked = [merger.entries[i] for i in (0, 5, 8)]
    for entry in picked:
        stats = entry.stats if recipe.op == "ties" else None
        again = merge_tensor(entry.plan, entry.inputs, recipe, stats=stats, out=entry.param.detach().clone())
        if not torch.equal(again, entry.param):
            return False
    return True


def profile_apply(merger: ResidentMerger, recipe: Recipe) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        merger.apply(recipe)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8), flush=True)


def bench_merge(layers: int, profile: bool = False) -> list[tuple[str, float, float]]:
    recipes = {
        "linear": {"op": "linear", "rules": [{"weight": 0.6}, {"source": "ja", "weight": 1.3}]},
        "ties": {"op": "ties", "rules": [{"weight": 1.0, "density": 0.4}]},
        "dare_ties": {"op": "dare_ties", "rules": [{"weight": 1.0, "density": 0.4}]},
    }
    merger, floor_bytes = build_merger(layers, ops=tuple(recipes))
    bandwidth = copy_bandwidth()
    floor = floor_bytes / bandwidth
    print(f"tower: {layers} layers, {floor_bytes / 2**30:.1f} GiB moved per candidate at the floor; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s -> floor {floor * 1e3:.1f} ms; "
          f"cache {sum(e.inputs.deltas.numel() * 3 for e in merger.entries) * 2 / 2**30:.0f} GiB")  # fmt: skip
    rows = []
    for name, raw in recipes.items():
        recipe = Recipe.from_dict({**raw, "sources": ["target", "ja"], "seed": 0})
        seconds = time_apply(merger, recipe)
        rows.append((name, seconds, seconds / floor))
        print(f"  {name}: {seconds * 1e3:.1f} ms = {seconds / floor:.2f} x floor; "
              f"bitwise the exporter's: {same_as_exporter(merger, recipe)}", flush=True)
        if profile:
            profile_apply(merger, recipe)
    del merger
    torch.cuda.empty_cache()
    return rows, floor


def bench_generation(batch: int, new_tokens: int, items: int = 64) -> tuple[float, float]:
    """tok/s of vlmerge's generate on a resident random 7B-shaped LLaVA-NeXT vs plain HF generate."""
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        MistralConfig,
        PreTrainedTokenizerFast,
    )

    from vlmerge.eval.generate import GenerationSettings, generate
    from vlmerge.eval.loading import ModelBundle
    from vlmerge.models.source import ModelRef

    words = "<unk> <s> </s> <pad> what colour is the shape in this picture how many are there ? <image>".split()
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", padding_side="left", extra_special_tokens=["<image>"])  # fmt: skip
    text = MistralConfig(vocab_size=VOCAB_VLM, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=32,
                         num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=4096)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)  # fmt: skip
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    config = LlavaNextConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                             image_token_index=words.index("<image>"), image_grid_pinpoints=pinpoints)  # fmt: skip
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlavaNextForConditionalGeneration(config).eval()
        torch.set_default_dtype(torch.float32)
    model.generation_config.eos_token_id = None  # random weights: every row generates exactly new_tokens
    model.generation_config.pad_token_id = words.index("<pad>")
    processor = LlavaNextProcessor(LlavaNextImageProcessor(image_grid_pinpoints=pinpoints, size={"shortest_edge": 336},
                                                           crop_size={"height": 336, "width": 336}), tok, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip
    bundle = ModelBundle(model=model, processor=processor, tokenizer=tok, family="llava_next",
                         ref=ModelRef(path=".", dtype="bfloat16", device="cuda"))  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(336, 336, 3, generator=gen) * 255).byte().numpy()) for _ in range(items)]
    prompts = ["<image> what colour is the shape in this picture ?"] * items
    settings = GenerationSettings(max_new_tokens=new_tokens, batch_size=batch)

    def ours():
        generate(bundle, prompts, images, settings)

    def plain():
        for i in range(0, items, batch):
            inputs = processor(text=prompts[i:i + batch], images=images[i:i + batch], return_tensors="pt",
                               padding=True).to("cuda", torch.bfloat16)  # fmt: skip
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    results = []
    for fn in (plain, ours, plain, ours):  # interleaved
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        torch.cuda.synchronize()
        results.append(items * new_tokens / (time.perf_counter() - start))
    return max(results[1], results[3]), max(results[0], results[2])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    for name in ("layers", "batch", "new_tokens"):  # before any tensor is allocated
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if not torch.cuda.is_available():
        parser.error("no CUDA device is visible: this benchmark runs on a GPU")
    torch.set_grad_enabled(False)
    merge_rows, floor = bench_merge(args.layers, args.profile)
    gen = None if args.skip_generation else bench_generation(args.batch, args.new_tokens)
    print(f"\n{torch.cuda.get_device_name()} | in-memory candidate merge, 7B-shaped bf16 tower, 2 sources")
    print(f"{'op':<10} {'ms':>8} {'x floor':>8} {'target':>7}")
    for name, seconds, ratio in merge_rows:
        target = 1.3 if name == "linear" else 3.0
        print(f"{name:<10} {seconds * 1e3:8.1f} {ratio:8.2f} {'<= ' + str(target):>7}")
    print(f"{'floor':<10} {floor * 1e3:8.1f}")
    if gen is not None:
        ours, plain = gen
        print(f"generation, 64 VQA items, batch {args.batch}, {args.new_tokens} new tokens: vlmerge {ours:.0f} tok/s, "
              f"plain HF generate {plain:.0f} tok/s, ratio {ours / plain:.2f}")


if __name__ == "__main__":
    main()
