"""BitFit (Ben Zaken et al., ACL 2022) on FGVC: every bias vector of the ViT-B/16 + head.

    python -m jvt.main --config=configs/fgvc/bitfit.py:task=cub,data_dir=/data/fgvc \
        --workdir=runs/fgvc/bitfit/cub

Protocol `fgvc`: train -> test at the epoch of best val accuracy, 5 seeds. The lr x wd grid
runs with `sweep=grid` (pick the pair whose final_metrics.json has the best val_accuracy, as
VPT's tune_fgvc did), then the seeds with that pair:

    python -m jvt.sweep \
        --config=configs/fgvc/bitfit.py:task=cub,data_dir=/data/fgvc,sweep=grid \
        --root=runs/fgvc_grid/bitfit/cub
    python -m jvt.sweep \
        --config=configs/fgvc/bitfit.py:task=cub,data_dir=/data/fgvc,lr=LR,wd=WD \
        --root=runs/fgvc/bitfit/cub
    python -m jvt.results --root=runs/fgvc --out=out/fgvc

Expected: no published ViT-B/16 ImageNet-21k FGVC mean is recorded with jvt's method notes
for BitFit; compare with full fine-tuning (88.54) and VPT-Deep (89.11) run the same way.

Recipe (as on VTAB-1k, NOAH's practice): AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs with 10
warm-up epochs, cosine; grid lr in {1e-2 ... 1e-4} x wd in {1e-2, 1e-3, 1e-4, 0} (20 runs).
`--config.tuning.subset` picks a subset of the biases, e.g. ('key', 'value').
"""
from configs import common

TUNING = dict(method="bitfit")
RECIPE = common.ADAMW
PUBLISHED = None  # no published FGVC mean recorded


def get_config(arg=None):
  return common.fgvc_config(arg, name="bitfit", tuning=TUNING, recipe=RECIPE)
