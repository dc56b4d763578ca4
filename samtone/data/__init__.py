"""Input pipelines: readers, tokenisation, batching into int32 arrays."""
import os

from samtone.data.tokenizer import Tokenizer, train_sentencepiece

SMOKE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smoke")

__all__ = ["SMOKE_DIR", "Tokenizer", "smoke_path", "train_sentencepiece"]


def smoke_path(name: str) -> str:
    """Installed path of a file of the shipped smoke dataset, e.g. `smoke_path("spm.model")`.

    The files (train.jsonl, eval.jsonl, spm.model) live in samtone/data/smoke/ and are made by
    scripts/make_smoke_data.py; see samtone/data/smoke/README.md.
    """
    path = os.path.join(SMOKE_DIR, name)
    if not os.path.isfile(path):
        available = sorted(os.listdir(SMOKE_DIR)) if os.path.isdir(SMOKE_DIR) else []
        raise FileNotFoundError(
            f"No smoke data file {name!r} at {path}. Available: {', '.join(available) or 'none'}. "
            "If the folder is empty, samtone was installed without its package data "
            "(setup.py package_data 'data/smoke/*'); from a checkout, "
            "`python scripts/make_smoke_data.py` regenerates it."
        )
    return path
