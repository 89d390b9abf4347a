"""A small deterministic trainer (plain torch) for the toy world's models.

One loop serves every stage: AdamW, linear warm-up then cosine decay, gradient clipping, loss on the
completion tokens only (on every token for pre-training). What a stage trains is a list of parameter groups,
each with its own learning-rate multiplier, so a stage can give each LM layer its own rate (see
`layer_groups`): that is how the toy world puts skills at different depths (build.py says why).

Determinism: every random choice (initialisation, batch order) comes from generators seeded by the stage
config, nothing uses dropout, and data are generated from seeds; on one machine with the same thread count
the saved bytes repeat. Across machines, CPUs or thread counts float reductions may differ in the last bits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from vlmerge.errors import VlmergeError
from vlmerge.toy import scenes as S
from vlmerge.toy.texts import Example
from vlmerge.toy.tokenizer import IMAGE

IGNORE = -100


@dataclass(frozen=True)
class StageConfig:
    """One training stage: steps, batch, peak learning rate, warm-up steps, seed of the batch order."""

    steps: int
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.warmup < 0:
            raise VlmergeError(f"toy training stage {self}: steps, batch_size and lr must be positive")


@dataclass(frozen=True)
class Encoded:
    """Token ids and labels of one example; `image` indexes the stage's image array (-1: no image)."""

    ids: tuple[int, ...]
    labels: tuple[int, ...]
    image: int = -1


@dataclass
class StageLog:
    """What a stage did: its loss every `every` steps, and its wall time."""

    name: str
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        first, last = self.losses[:1], self.losses[-1:]
        return {"stage": self.name, "seconds": round(self.seconds, 1),
                "first_loss": first[0] if first else None, "last_loss": last[0] if last else None}


def encode_document(tokenizer, text: str) -> Encoded:
    """Pre-training text: `<s> text </s>`, loss on every token after `<s>`."""
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    return Encoded(tuple(ids), tuple(ids))


def encode_example(tokenizer, example: Example, *, image_tokens: int = 0, image: int = -1) -> Encoded:
    """Prompt + completion + `</s>`, loss on the completion and `</s>` only; each `<image>` of the prompt
    becomes `image_tokens` image-token ids, as CompositeProcessor expands it."""
    prompt = tokenizer(example.prompt)["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    if image_tokens:
        prompt = [t for tok in prompt for t in ([tok] * image_tokens if tok == image_id else [tok])]
    elif image_id in prompt:
        raise VlmergeError(f"toy example {example.prompt[:40]!r} holds <image> but the stage has no images")
    completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    completion.append(tokenizer.eos_token_id)
    return Encoded(tuple(prompt + completion), (IGNORE,) * len(prompt) + tuple(completion), image)



def scene_pixels(scenes: Sequence[S.Scene]) -> np.ndarray:
    """uint8 [n, 3, H, W] renders (normalised per batch by `normalise`, the processor's transform)."""
    return np.stack([np.asarray(S.render(s), dtype=np.uint8).transpose(2, 0, 1) for s in scenes])


def normalise(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """ToTensor + Normalize of torchvision on already-sized uint8 images (what CompositeProcessor feeds)."""
    x = torch.from_numpy(pixels).float().div(255)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels (padding ignored by the loss)."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def layer_groups(model: nn.Module, layer_lr: Sequence[float], *, head_lr: float | None = None,
                 train_embeddings: bool = False) -> list[dict]:
    """Parameter groups of a causal LM: layer i at multiplier `layer_lr[i]`, the final norm at `head_lr`
    (default: the last layer's). Embeddings and LM head train only if `train_embeddings` (then at 1);
    frozen parameters get requires_grad False. A multiplier of 0 freezes that layer."""
    layers = model.model.layers
    if len(layer_lr) != len(layers):
        raise VlmergeError(f"layer_lr has {len(layer_lr)} values for {len(layers)} LM layers")
    groups = [{"params": list(layer.parameters()), "lr_scale": float(scale)}
              for layer, scale in zip(layers, layer_lr)]
    groups.append({"params": list(model.model.norm.parameters()),
                   "lr_scale": float(layer_lr[-1] if head_lr is None else head_lr)})
    ends = list(model.model.embed_tokens.parameters()) + list(model.lm_head.parameters())
    groups.append({"params": ends, "lr_scale": 1.0 if train_embeddings else 0.0})
    return groups


def module_group(module: nn.Module, lr_scale: float = 1.0) -> dict:
    return {"params": list(module.parameters()), "lr_scale": float(lr_scale)}


def train(name: str, forward: Callable[[list[int]], torch.Tensor], lengths: Sequence[int], groups: list[dict],
          cfg: StageConfig, *, log_every: int = 50, verbose: bool = True) -> StageLog:
    """Run `cfg.steps` AdamW steps; `forward(indices)` returns the mean loss of those examples.

    `lengths[i]` is example i's token count (batches group similar lengths: less padding, same data).
    """
    live = []
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(g["lr_scale"] > 0)
        if g["lr_scale"] > 0 and g["params"]:
            live.append({"params": g["params"], "lr_scale": g["lr_scale"], "lr": cfg.lr * g["lr_scale"]})
    if not live:
        raise VlmergeError(f"toy training stage {name}: nothing to train")
    optimizer = torch.optim.AdamW(live, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    log, start, running = StageLog(name), time.perf_counter(), []
    for step, batch in enumerate(batches(lengths, cfg)):
        factor = lr_factor(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * g["lr_scale"] * factor
        loss = forward(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in live for p in g["params"]], cfg.clip)
        optimizer.step()
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            log.losses.append(round(sum(running) / len(running), 4))
            running = []
            if verbose:
                print(f"  {name} step {step + 1}/{cfg.steps} loss {log.losses[-1]:.4f}", flush=True)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    log.seconds = time.perf_counter() - start
    return log


def batches(lengths: Sequence[int], cfg: StageConfig, pool: int = 16) -> list[list[int]]:
    """`cfg.steps` batches of example indices: a seeded permutation (renewed each epoch) is cut into pools
    of `pool` batches; each pool is sorted by length, cut into batches, and the batches are shuffled."""
    generator = torch.Generator().manual_seed(cfg.seed)
    n, size, out, order = len(lengths), cfg.batch_size, [], []
    while len(out) < cfg.steps:
        while len(order) < size * pool:
            order += torch.randperm(n, generator=generator).tolist()
        chunk, order = order[:size * pool], order[size * pool:]
        chunk.sort(key=lambda i: lengths[i])
        group = [chunk[i:i + size] for i in range(0, len(chunk), size)]
        out += [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
    return out[:cfg.steps]


def lr_factor(step: int, cfg: StageConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def lm_forward(model: nn.Module, data: Sequence[Encoded], pad_id: int) -> Callable[[list[int]], torch.Tensor]:
    device = next(model.parameters()).device

    def forward(indices: list[int]) -> torch.Tensor:
        batch = collate([data[i] for i in indices], pad_id)
        return model(**{k: v.to(device) for k, v in batch.items()}).loss
    return forward


def vlm_forward(model: nn.Module, data: Sequence[Encoded], pixels: np.ndarray,
                pad_id: int) -> Callable[[list[int]], torch.Tensor]:
    """Loss of a CompositeVLM on examples whose `image` indexes `pixels`."""
    mean, std = model.config.image_mean, model.config.image_std
    device = next(model.parameters()).device

    def forward(indices: list[int]) -> torch.Tensor:
        batch = [data[i] for i in indices]
        images = normalise(pixels[[e.image for e in batch]], mean, std).to(device)
        tensors = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
        return model(**tensors, pixel_values=images).loss
    return forward


def train_lm(name: str, model: nn.Module, tokenizer, data: Sequence[Encoded], cfg: StageConfig,
             layer_lr: Sequence[float], *, train_embeddings: bool = False, verbose: bool = True) -> StageLog:
    """Train a causal LM in place with a per-layer learning-rate profile."""
    model.train()
    groups = layer_groups(model, layer_lr, train_embeddings=train_embeddings)
    forward = lm_forward(model, data, tokenizer.pad_token_id)
    log = train(name, forward, [len(e.ids) for e in data], groups, cfg, verbose=verbose)
    model.eval()
    return log


def train_vlm(name: str, model: nn.Module, tokenizer, data: Sequence[Encoded], pixels: np.ndarray,
              cfg: StageConfig, layer_lr: Sequence[float], *, vision_lr: float = 1.0,
              projector_lr: float = 1.0, verbose: bool = True) -> StageLog:
    """Train a CompositeVLM in place: vision encoder at `vision_lr` (0 = frozen), projector at
    `projector_lr`, LM layers by profile (all zeros = a projector warm-up against the frozen LM)."""
    model.train()
    groups = layer_groups(model.language_model, layer_lr)
    groups += [module_group(model.vision_encoder, vision_lr), module_group(model.projector, projector_lr)]
    forward = vlm_forward(model, data, pixels, tokenizer.pad_token_id)
    log = train(name, forward, [len(e.ids) for e in data], groups, cfg, verbose=verbose)
    model.eval()
    return log


def cell_targets(scenes: Sequence[S.Scene]) -> torch.Tensor:
    """[n, 4, 2] class ids per grid cell (reading order): shape (0 = empty, then SHAPES order) and colour
    (0 = empty, then COLOURS order) -- what a picture shows, as labels for the vision pre-training."""
    shapes, colours = list(S.SHAPES), list(S.COLOURS)
    out = torch.zeros((len(scenes), len(S.CELLS), 2), dtype=torch.long)
    for i, scene in enumerate(scenes):
        for shape in scene.shapes:
            cell = S.CELLS.index(shape.cell)
            out[i, cell, 0] = 1 + shapes.index(shape.kind)
            out[i, cell, 1] = 1 + colours.index(shape.colour)
    return out


class CellProbe(nn.Module):
    """Reads each grid cell's shape and colour from the mean of the patch tokens that cover it."""

    def __init__(self, width: int, grid: int):
        super().__init__()
        if grid % 2:
            raise VlmergeError(f"vision pre-training needs an even patch grid, got {grid}x{grid}")
        self.grid = grid
        self.shape = nn.Linear(width, 1 + len(S.SHAPES))
        self.colour = nn.Linear(width, 1 + len(S.COLOURS))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, w = tokens.shape
        half = self.grid // 2
        cells = tokens.reshape(b, 2, half, 2, half, w).mean(dim=(2, 4)).reshape(b, 4, w)
        return self.shape(cells), self.colour(cells)


def pretrain_vision(name: str, model: nn.Module, pixels: np.ndarray, targets: torch.Tensor, cfg: StageConfig,
                    *, verbose: bool = True, log_every: int = 50) -> StageLog:
    """Pre-train a CompositeVLM's vision encoder alone (the toy's stand-in for CLIP pre-training): predict
    every cell's shape and colour from its patch tokens. The probe is thrown away afterwards."""
    encoder = model.vision_encoder
    grid = int(round(model.num_image_tokens ** 0.5))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        probe = CellProbe(encoder.conv1.out_channels, grid)
    mean, std = model.config.image_mean, model.config.image_std
    device = encoder.conv1.weight.device
    probe.to(device)
    loss_fn = nn.CrossEntropyLoss()

    def forward(indices: list[int]) -> torch.Tensor:
        _, tokens = encoder(normalise(pixels[indices], mean, std).to(device))
        shape_logits, colour_logits = probe(tokens)
        labels = targets[indices].to(device)
        return (loss_fn(shape_logits.flatten(0, 1), labels[..., 0].flatten())
                + loss_fn(colour_logits.flatten(0, 1), labels[..., 1].flatten()))

    encoder.train()
    groups = [module_group(encoder), module_group(probe)]
    log = train(name, forward, [1] * len(pixels), groups, cfg, verbose=verbose, log_every=log_every)
    encoder.eval()
    return log
