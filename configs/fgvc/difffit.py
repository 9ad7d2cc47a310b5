"""DiffFit (Xie et al., ICCV 2023) on FGVC: biases, layer norms and a per-block scale on the
attention and MLP branches + head.

    python -m jvt.main --config=configs/fgvc/difffit.py:task=cub,data_dir=/data/fgvc \
        --workdir=runs/fgvc/difffit/cub

Protocol `fgvc`: train -> test at the epoch of best val accuracy, 5 seeds. The lr x wd grid
runs with `sweep=grid`, then the seeds with the best pair:

    python -m jvt.sweep \
        --config=configs/fgvc/difffit.py:task=cub,data_dir=/data/fgvc,sweep=grid \
        --root=runs/fgvc_grid/difffit/cub
    python -m jvt.sweep \
        --config=configs/fgvc/difffit.py:task=cub,data_dir=/data/fgvc,lr=LR,wd=WD \
        --root=runs/fgvc/difffit/cub
    python -m jvt.results --root=runs/fgvc --out=out/fgvc

Expected: no published ViT-B/16 ImageNet-21k FGVC number (DiffFit is published for
diffusion transformers, DiT). Compare with BitFit (VTAB-1k 65.22) and SSF (VTAB-1k 75.69), its
neighbours in parameter count, run the same way.

Recipe (the VTAB-1k practice of the parameter-tuning methods, NOAH's): AdamW lr 1e-3, wd 1e-4,
batch 64, 100 epochs with 10 warm-up epochs, cosine; grid lr in {1e-2 ... 1e-4} x wd in
{1e-2, 1e-3, 1e-4, 0} (20 runs). The scales start at 1; the scales fold into the out and
Dense_1 kernels, so the run's export is a plain ViT-B/16.
"""
from configs import common

TUNING = dict(method="difffit")
RECIPE = common.ADAMW
PUBLISHED = None  # no published number


def get_config(arg=None):
  return common.fgvc_config(arg, name="difffit", tuning=TUNING, recipe=RECIPE)
