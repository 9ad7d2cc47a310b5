"""RepAdapter (Luo et al. 2023) on FGVC: group-wise linear adapters before attention and MLP,
merged into the next projections after training.

    python -m jvt.main --config=configs/fgvc/repadapter.py:task=cub,data_dir=/data/fgvc \
        --workdir=runs/fgvc/repadapter/cub

Protocol `fgvc`: train -> test at the epoch of best val accuracy, 5 seeds. The lr x wd grid
runs with `sweep=grid`, then the seeds with the best pair:

    python -m jvt.sweep \
        --config=configs/fgvc/repadapter.py:task=cub,data_dir=/data/fgvc,sweep=grid \
        --root=runs/fgvc_grid/repadapter/cub
    python -m jvt.sweep \
        --config=configs/fgvc/repadapter.py:task=cub,data_dir=/data/fgvc,lr=LR,wd=WD \
        --root=runs/fgvc/repadapter/cub
    python -m jvt.results --root=runs/fgvc --out=out/fgvc

Expected: no published ViT-B/16 ImageNet-21k FGVC mean is recorded with jvt's method
notes for RepAdapter; compare with AdaptFormer (88.48) and full fine-tuning (88.54) run the
same way.

Recipe (the authors' VTAB-1k recipe): AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs with 10
warm-up epochs, cosine; dim 8, 2 groups, s = 1 (`scale=X` changes it), dropout 0.1. Merges
exactly into a plain ViT-B/16.
"""
from configs import common

TUNING = dict(method="repadapter", dim=8, groups=2, scale=1.0)
RECIPE = common.ADAMW
PUBLISHED = None  # no published FGVC mean recorded


def get_config(arg=None):
  return common.fgvc_config(arg, name="repadapter", tuning=TUNING, recipe=RECIPE)
