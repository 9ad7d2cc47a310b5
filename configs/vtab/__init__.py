"""VTAB-1k configs: one file per method (see configs/common.py)."""
