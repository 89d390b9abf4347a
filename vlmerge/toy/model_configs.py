"""The tiny architectures of the toy world: one bilingual Mistral LM, one OpenCLIP ViT, one MLP projector.

Sizes are chosen for a laptop CPU: the LM has about a million parameters (hidden 128, 6 layers; the
vocabulary is the toy tokenizer's ~180 pieces), the ViT about 0.1M (32 px images, 8 px patches = 16 image
tokens, one per quarter of a scene cell). Six LM layers leave room for skills to sit at different depths,
which is what a per-layer merge recipe can exploit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import MistralConfig, MistralForCausalLM

from vlmerge.errors import VlmergeError


@dataclass(frozen=True)
class LMArch:
    """A Mistral causal LM; the vocabulary size comes from the tokenizer."""

    hidden_size: int = 128
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise VlmergeError(f"toy LM hidden_size {self.hidden_size} is not divisible by "
                               f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise VlmergeError(f"toy LM num_attention_heads {self.num_attention_heads} is not divisible by "
                               f"num_key_value_heads {self.num_key_value_heads}")

    def config(self, tokenizer) -> MistralConfig:
        fields = asdict(self)
        rope_theta = fields.pop("rope_theta")
        return MistralConfig(
            vocab_size=len(tokenizer), tie_word_embeddings=False, sliding_window=None,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, **fields,
        )


@dataclass(frozen=True)
class VisionArch:
    """An OpenCLIP ViT (CLIPVisionCfg fields, as `vlmerge_composite.json` stores them) and its projector."""

    image_size: int = 32
    patch_size: int = 8
    width: int = 64
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 2.0
    projector: str = "mlp2x_gelu"

    def vision_config(self) -> dict:
        return {"image_size": self.image_size, "patch_size": self.patch_size, "width": self.width,
                "layers": self.layers, "heads": self.heads, "mlp_ratio": self.mlp_ratio}

    def projector_config(self) -> dict:
        return {"type": self.projector}


def new_lm(arch: LMArch, tokenizer, seed: int) -> MistralForCausalLM:
    """A freshly initialised fp32 LM; the weights depend only on (arch, vocabulary, seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MistralForCausalLM(arch.config(tokenizer))
    model.config._attn_implementation = "eager"  # on CPU at these sizes several times faster than sdpa
    return model.to(torch.float32)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
