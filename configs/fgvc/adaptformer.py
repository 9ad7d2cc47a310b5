"""AdaptFormer (Chen et al., NeurIPS 2022) on FGVC: a parallel adapter beside every MLP + head.

    python -m jvt.main --config=configs/fgvc/adaptformer.py:task=cub,data_dir=/data/fgvc \
        --workdir=runs/fgvc/adaptformer/cub

Protocol `fgvc`: train -> test at the epoch of best val accuracy, 5 seeds. The lr x wd grid
runs with `sweep=grid` (pick the pair whose final_metrics.json has the best val_accuracy, as
VPT's tune_fgvc did), then the seeds with that pair:

    python -m jvt.sweep \
        --config=configs/fgvc/adaptformer.py:task=cub,data_dir=/data/fgvc,sweep=grid \
        --root=runs/fgvc_grid/adaptformer/cub
    python -m jvt.sweep \
        --config=configs/fgvc/adaptformer.py:task=cub,data_dir=/data/fgvc,lr=LR,wd=WD \
        --root=runs/fgvc/adaptformer/cub
    python -m jvt.results --root=runs/fgvc --out=out/fgvc

Expected: the mean test top-1 over the five tasks (cub, nabirds, flowers, dogs, cars) should
reach the published 88.48 (ViT-B/16 ImageNet-21k, `pretrained=ViT-B_16.npz`, VPT's json
splits under `data_dir`).

Recipe (as on VTAB-1k, NOAH's practice): AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs with 10
warm-up epochs, cosine; grid lr in {1e-2 ... 1e-4} x wd in {1e-2, 1e-3, 1e-4, 0} (20 runs).
x + MLP(LN x) + 0.1 * Up(ReLU(Down(LN x))), Up zero-initialised; bottleneck 8 (the small end of
AdaptFormer's 8-64; `dim=64`, `scale=X` change them).
"""
from configs import common

TUNING = dict(method="adaptformer", dim=8, scale=0.1)
RECIPE = common.ADAMW
PUBLISHED = 88.48  # FGVC mean test top-1 over the five tasks (%)


def get_config(arg=None):
  return common.fgvc_config(arg, name="adaptformer", tuning=TUNING, recipe=RECIPE)
