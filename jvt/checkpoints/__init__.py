"""Checkpoints: pretrained ViT files in, vision_transformer npz out, orbax run checkpoints."""
from jvt.checkpoints.export import save_npz
from jvt.checkpoints.formats import FORMATS, CheckpointFormatError, detect_format, read_checkpoint
from jvt.checkpoints.posemb import resize_posemb
from jvt.checkpoints.pretrained import CheckpointMismatchError, load_pretrained
from jvt.checkpoints.runs import RunCheckpointer

__all__ = [
    "FORMATS",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "RunCheckpointer",
    "detect_format",
    "load_pretrained",
    "read_checkpoint",
    "resize_posemb",
    "save_npz",
]
