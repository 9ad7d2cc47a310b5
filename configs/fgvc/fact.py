"""FacT (Jie & Deng, AAAI 2023) on FGVC: factorised weight increments shared across layers.

    python -m jvt.main --config=configs/fgvc/fact.py:task=cub,data_dir=/data/fgvc \
        --workdir=runs/fgvc/fact/cub

Protocol `fgvc`: train -> test at the epoch of best val accuracy, 5 seeds. The lr x wd grid
runs with `sweep=grid`, then the seeds with the best pair:

    python -m jvt.sweep \
        --config=configs/fgvc/fact.py:task=cub,data_dir=/data/fgvc,sweep=grid \
        --root=runs/fgvc_grid/fact/cub
    python -m jvt.sweep \
        --config=configs/fgvc/fact.py:task=cub,data_dir=/data/fgvc,lr=LR,wd=WD \
        --root=runs/fgvc/fact/cub
    python -m jvt.results --root=runs/fgvc --out=out/fgvc

Expected: no published FGVC result for FacT (the paper covers VTAB-1k and few-shot FGVC);
compare with full fine-tuning (88.54) and SSF (90.72) run the same way.

Recipe (the authors' VTAB-1k recipe): AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs with 10
warm-up epochs, cosine; FacT-TK rank 32, scale 1 (`variant=tt`, `rank=N`, `scale=X` change
them), dropout 0.1. Mergeable into a plain ViT-B/16.
"""
from configs import common

TUNING = dict(method="fact", variant="tk", rank=32, scale=1.0)
RECIPE = common.ADAMW
PUBLISHED = None  # no published FGVC mean


def get_config(arg=None):
  return common.fgvc_config(arg, name="fact", tuning=TUNING, recipe=RECIPE)
