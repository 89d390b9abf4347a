"""vlmerge: merge LLMs into the language tower of VLMs; search recipes with CMA-ES."""

from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# `${repo:eval_data/toy_vqa_ja}` in a config = that path under the project checkout, whatever the working
# directory (Ray workers and runs started elsewhere read the same files).
OmegaConf.register_new_resolver("repo", lambda path: str(PROJECT_ROOT / path), replace=True)
