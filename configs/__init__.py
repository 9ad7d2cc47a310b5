"""jvt's config files, importable as a package (`from configs import common`).

`configs/<benchmark>/<method>.py` builds the VTAB-1k / FGVC config of one method through
`configs/common.py`; load any file with `--config=configs/vtab/vpt_deep.py:task=cifar100` or
`jvt.config_lib.load_config(...)`.
"""
