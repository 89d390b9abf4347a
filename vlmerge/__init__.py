"""vlmerge: merge LLMs into the language tower of VLMs; search recipes with CMA-ES."""

__version__ = "0.1.0"
