"""Checkpoints: saving and resuming training, and reading pretrained or foreign weights.

  manager.py     training checkpoints: the sharded train state and the data position, saved
                 and restored by orbax (serving reads only the parameters)
  layout.py      matching a checkpoint's tree to the configured one: the same, another layer
                 layout (scanned or per layer), or another model (refused)
  pretrained.py  `INIT_CHECKPOINT`: pretrained encoder weights for a dual encoder's towers
  hf.py, t5x.py  importers of Hugging Face T5 folders and T5X checkpoints
  lazy.py        their arrays read when placed, slice by slice: each process reads only the
                 shards its devices hold
  convert.py     `samtone-convert`: a Hugging Face or T5X checkpoint as a samtone checkpoint

Importing the package imports none of them; import the module you use
(`from samtone.checkpoints import manager`). The importers' entry points also stand here,
loaded on first use: `load_hf_t5_encoder`, `load_t5x_checkpoint`, `t5x_encoder_to_samtone`,
`t5x_dual_encoder_to_samtone`.
"""
import importlib

_LAZY = {
    "load_hf_t5_encoder": "hf",
    "load_t5x_checkpoint": "t5x",
    "t5x_encoder_to_samtone": "t5x",
    "t5x_dual_encoder_to_samtone": "t5x",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
