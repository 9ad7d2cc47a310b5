"""DoRA (Liu et al., ICML 2024) on FGVC: weight-decomposed rank-8 updates of the query and
value projections + head.

    python -m jvt.main --config=configs/fgvc/dora.py:task=cub,data_dir=/data/fgvc \
        --workdir=runs/fgvc/dora/cub

Protocol `fgvc`: train -> test at the epoch of best val accuracy, 5 seeds. The lr x wd grid
runs with `sweep=grid`, then the seeds with the best pair:

    python -m jvt.sweep \
        --config=configs/fgvc/dora.py:task=cub,data_dir=/data/fgvc,sweep=grid \
        --root=runs/fgvc_grid/dora/cub
    python -m jvt.sweep \
        --config=configs/fgvc/dora.py:task=cub,data_dir=/data/fgvc,lr=LR,wd=WD \
        --root=runs/fgvc/dora/cub
    python -m jvt.results --root=runs/fgvc --out=out/fgvc

Expected: no published ViT-B/16 ImageNet-21k FGVC number (the DoRA authors, NVlabs/DoRA,
publish language and vision-language results). Compare with LoRA (VTAB-1k 74.5) run the
same way: DoRA should match or exceed it.

Recipe (as LoRA's, NOAH's practice): AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs with 10
warm-up epochs, cosine; grid lr in {1e-2 ... 1e-4} x wd in {1e-2, 1e-3, 1e-4, 0} (20 runs).
Rank 8, alpha 8, magnitude initialised to the column norms of the pretrained kernels, the
norm a constant for the gradient as the authors' default (`detach_norm`). Mergeable: the
run's export is a plain ViT-B/16.
"""
from configs import common

TUNING = dict(method="dora", rank=8, alpha=8.0, targets=("query", "value"))
RECIPE = common.ADAMW
PUBLISHED = None  # no published number


def get_config(arg=None):
  return common.fgvc_config(arg, name="dora", tuning=TUNING, recipe=RECIPE)
