"""LoRA (Hu et al., ICLR 2022) on FGVC: rank-8 updates of the query and value projections + head.

    python -m jvt.main --config=configs/fgvc/lora.py:task=cub,data_dir=/data/fgvc \
        --workdir=runs/fgvc/lora/cub

Protocol `fgvc`: train -> test at the epoch of best val accuracy, 5 seeds. The lr x wd grid
runs with `sweep=grid` (pick the pair whose final_metrics.json has the best val_accuracy, as
VPT's tune_fgvc did), then the seeds with that pair:

    python -m jvt.sweep \
        --config=configs/fgvc/lora.py:task=cub,data_dir=/data/fgvc,sweep=grid \
        --root=runs/fgvc_grid/lora/cub
    python -m jvt.sweep \
        --config=configs/fgvc/lora.py:task=cub,data_dir=/data/fgvc,lr=LR,wd=WD \
        --root=runs/fgvc/lora/cub
    python -m jvt.results --root=runs/fgvc --out=out/fgvc

Expected: no published ViT-B/16 ImageNet-21k FGVC mean is recorded with jvt's method notes
for LoRA; compare with full fine-tuning (88.54) and VPT-Deep (89.11) run the same way.

Recipe (as on VTAB-1k, NOAH's practice): AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs with 10
warm-up epochs, cosine; grid lr in {1e-2 ... 1e-4} x wd in {1e-2, 1e-3, 1e-4, 0} (20 runs).
A random (small normal), B zero, scale alpha / r = 1; `rank=N`, `alpha=X` change them.
"""
from configs import common

TUNING = dict(method="lora", rank=8, alpha=8.0, targets=("query", "value"))
RECIPE = common.ADAMW
PUBLISHED = None  # no published FGVC mean recorded


def get_config(arg=None):
  return common.fgvc_config(arg, name="lora", tuning=TUNING, recipe=RECIPE)
