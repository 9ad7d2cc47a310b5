"""Adapter+ (Steitz & Roth, CVPR 2024) on FGVC: one adapter after every block with channel-wise
scaling (`adapter` with `placement="adapter_plus"`) + head.

    python -m jvt.main --config=configs/fgvc/adapter_plus.py:task=cub,data_dir=/data/fgvc \
        --workdir=runs/fgvc/adapter_plus/cub

The authors' per-task bottleneck (visinf/adapter_plus `conf/experiment/fgvc/
adapter_plus_dim1-32.yaml`) is the default below, chosen by `task`; `dim=N` overrides it.
Protocol `fgvc`: train -> test at the epoch of best val accuracy, 5 seeds (the authors train
on train+val with the fixed recipe and test at the end; `sweep=grid` runs the lr x wd grid):

    python -m jvt.sweep \
        --config=configs/fgvc/adapter_plus.py:task=cub,data_dir=/data/fgvc \
        --root=runs/fgvc/adapter_plus/cub
    python -m jvt.results --root=runs/fgvc --out=out/fgvc

Expected: no published FGVC mean for Adapter+ is recorded with jvt's method notes; compare
with SSF (90.72) and VPT-Deep (89.11) run the same way.

Recipe (authors' conf/): AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs with 10 warm-up epochs,
cosine; drop-path 0.1 on the adapter; Houlsby init (truncated normal, std 0.01).
"""
from configs import common

# task -> bottleneck width, from the authors' FGVC adapter_plus_dim1-32 experiment.
TASKS = {"cub": 2, "nabirds": 2, "flowers": 1, "dogs": 1, "cars": 32}
TUNING = dict(method="adapter", dim=2, placement="adapter_plus", drop_path=0.1)
RECIPE = common.ADAMW
PUBLISHED = None  # no FGVC mean recorded



def get_config(arg=None):
  dim = TASKS.get(common.arg_value(arg, "task", "cub"), TASKS["cub"])
  return common.fgvc_config(arg, name="adapter_plus", tuning=dict(TUNING, dim=dim),
                            recipe=RECIPE)
