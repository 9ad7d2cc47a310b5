"""Checkpoints: pretrained ViT files in, vision_transformer npz out (a run's own orbax
checkpoints are training machinery: `jvt.train.checkpointing`)."""
from jvt.checkpoints.export import save_npz
from jvt.checkpoints.formats import FORMATS, CheckpointFormatError, detect_format, read_checkpoint
from jvt.checkpoints.posemb import resize_posemb
from jvt.checkpoints.pretrained import CheckpointMismatchError, load_pretrained

__all__ = [
    "FORMATS",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "detect_format",
    "load_pretrained",
    "read_checkpoint",
    "resize_posemb",
    "save_npz",
]
