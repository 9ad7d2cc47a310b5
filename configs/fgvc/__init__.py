"""FGVC configs: one file per method (see configs/common.py)."""
