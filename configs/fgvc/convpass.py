"""Convpass (Jie & Deng 2022) on FGVC: convolutional bypasses beside attention and MLP + head.

    python -m jvt.main --config=configs/fgvc/convpass.py:task=cub,data_dir=/data/fgvc \
        --workdir=runs/fgvc/convpass/cub

Protocol `fgvc`: train -> test at the epoch of best val accuracy, 5 seeds. The lr x wd grid
runs with `sweep=grid`, then the seeds with the best pair:

    python -m jvt.sweep \
        --config=configs/fgvc/convpass.py:task=cub,data_dir=/data/fgvc,sweep=grid \
        --root=runs/fgvc_grid/convpass/cub
    python -m jvt.sweep \
        --config=configs/fgvc/convpass.py:task=cub,data_dir=/data/fgvc,lr=LR,wd=WD \
        --root=runs/fgvc/convpass/cub
    python -m jvt.results --root=runs/fgvc --out=out/fgvc

Expected: no published FGVC result for Convpass (the authors' README covers VTAB-1k, 76.56);
compare with AdaptFormer (88.48) and full fine-tuning (88.54) run the same way.

Recipe (the authors' VTAB-1k recipe, NOAH's practice): AdamW lr 1e-3, wd 1e-4, batch 64, 100
epochs with 10 warm-up epochs, cosine; dim 8, s = 1 and the identity conv init (the authors'
defaults; their VTAB runs choose s per task from {0.01, ..., 100}: `scale=X`), dropout 0.1.
"""
from configs import common

TUNING = dict(method="convpass", dim=8, scale=1.0, conv_init="identity")
RECIPE = common.ADAMW
PUBLISHED = None  # no published FGVC mean


def get_config(arg=None):
  return common.fgvc_config(arg, name="convpass", tuning=TUNING, recipe=RECIPE)
