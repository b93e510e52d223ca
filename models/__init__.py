"""trilut.models"""

from .bitnet import BitNetConfig, BitNetModel, KVCache
from .checkpoint import CheckpointError, build_tiny_checkpoint, load_checkpoint, save_checkpoint

__all__ = [
    "BitNetConfig", "BitNetModel", "KVCache",
    "CheckpointError", "build_tiny_checkpoint", "load_checkpoint", "save_checkpoint",
]
