"""SSF (Lian et al., NeurIPS 2022) on FGVC: per-channel scale and shift of every operation.

    python -m jvt.main --config=configs/fgvc/ssf.py:task=cub,data_dir=/data/fgvc \
        --workdir=runs/fgvc/ssf/cub

Protocol `fgvc`: train -> test at the epoch of best val accuracy, 5 seeds. The lr x wd grid
runs with `sweep=grid` (pick the pair whose final_metrics.json has the best val_accuracy, as
VPT's tune_fgvc did), then the seeds with that pair:

    python -m jvt.sweep \
        --config=configs/fgvc/ssf.py:task=cub,data_dir=/data/fgvc,sweep=grid \
        --root=runs/fgvc_grid/ssf/cub
    python -m jvt.sweep \
        --config=configs/fgvc/ssf.py:task=cub,data_dir=/data/fgvc,lr=LR,wd=WD \
        --root=runs/fgvc/ssf/cub
    python -m jvt.results --root=runs/fgvc --out=out/fgvc

Expected: the mean test top-1 over the five tasks (cub, nabirds, flowers, dogs, cars) should
reach the published 90.72 (ViT-B/16 ImageNet-21k, `pretrained=ViT-B_16.npz`, VPT's json
splits under `data_dir`).

Recipe (as on VTAB-1k, NOAH's practice): AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs with 10
warm-up epochs, cosine; grid lr in {1e-2 ... 1e-4} x wd in {1e-2, 1e-3, 1e-4, 0} (20 runs).
Mergeable: the run's export/merged_vit.npz is a plain ViT-B/16. Not reproduced: SSF's mixup /
label smoothing / drop-path training options.
"""
from configs import common

TUNING = dict(method="ssf")
RECIPE = common.ADAMW
PUBLISHED = 90.72  # FGVC mean test top-1 over the five tasks (%)


def get_config(arg=None):
  return common.fgvc_config(arg, name="ssf", tuning=TUNING, recipe=RECIPE)
