"""trilut.models: numerics (numpy only), the golden model and checkpoints (torch).

The golden model and the checkpoint code load torch; they are imported on first use, so that
``trilut.models.numerics`` (and with it the config and the HDL) imports without torch.
"""

import importlib

_LAZY = {
    "BitNetConfig": "bitnet", "BitNetModel": "bitnet", "KVCache": "bitnet",
    "CheckpointError": "checkpoint", "build_tiny_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
