"""Session fixtures: tiny random models built once per test session (no hub access)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """Tiny random models sharing one base: LLMs (Mistral, Llama, Qwen2), LLaVA, LLaVA-NeXT, a composite VLM.

    base -> ja (Mistral fine-tune), math (saved as Llama), vlm_lm (the VLMs' language tower);
    qwen_base -> qwen_ft. Every VLM tower has one extra vocabulary row (`<image>`), as LLaVA does.
    """
    from tests.fixtures.composite import make_composite
    from tests.fixtures.hf_models import make_base_lm, make_finetune, make_llava

    root = tmp_path_factory.mktemp("tiny")
    ns = SimpleNamespace(root=root)
    ns.base = make_base_lm(root / "base")
    ns.ja = make_finetune(ns.base, root / "ja", seed=1)
    ns.math = make_finetune(ns.base, root / "math", seed=2, arch="llama")
    ns.vlm_lm = make_finetune(ns.base, root / "vlm_lm", seed=3)
    ns.llava = make_llava(root / "llava", ns.vlm_lm)
    ns.llava_next = make_llava(root / "llava_next", ns.vlm_lm, next_=True)
    ns.qwen_base = make_base_lm(root / "qwen_base", "qwen2", seed=4)
    ns.qwen_ft = make_finetune(ns.qwen_base, root / "qwen_ft", seed=5)
    ns.composite = make_composite(root / "composite", language_model_dir=ns.vlm_lm, seed=6)
    return ns




@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models on a loaded 2-core machine run 10-50x slower with 2 threads than with 1."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
