"""Linear probe on FGVC: a new head on the frozen ViT-B/16 [CLS] feature.

    python -m jvt.main --config=configs/fgvc/linear.py:task=cub,data_dir=/data/fgvc \
        --workdir=runs/fgvc/linear/cub

Protocol `fgvc`: train -> test at the epoch of best val accuracy, 5 seeds. The lr x wd grid
runs with `sweep=grid` (pick the pair whose final_metrics.json has the best val_accuracy, as
VPT's tune_fgvc did), then the seeds with that pair:

    python -m jvt.sweep \
        --config=configs/fgvc/linear.py:task=cub,data_dir=/data/fgvc,sweep=grid \
        --root=runs/fgvc_grid/linear/cub
    python -m jvt.sweep \
        --config=configs/fgvc/linear.py:task=cub,data_dir=/data/fgvc,lr=LR,wd=WD \
        --root=runs/fgvc/linear/cub
    python -m jvt.results --root=runs/fgvc --out=out/fgvc

Expected: the mean test top-1 over the five tasks (cub, nabirds, flowers, dogs, cars) should
reach the published 79.32 (VPT's "Linear" baseline, ViT-B/16 ImageNet-21k,
`pretrained=ViT-B_16.npz`, VPT's json splits under `data_dir`).

Recipe (VPT's linear probe): SGD momentum 0.9, cosine, 10 warm-up epochs of 100, base lr x
batch / 256 with base lr in {50 ... 0.05} and wd in {0.01, 0.001, 1e-4, 0} chosen per task
(40 runs); batch 128 (VPT used 1024; the lr rule scales the rate).
"""
from configs import common

TUNING = dict(method="linear")
RECIPE = common.SGD_FGVC
PUBLISHED = 79.32  # FGVC mean test top-1 over the five tasks (%)


def get_config(arg=None):
  return common.fgvc_config(arg, name="linear", tuning=TUNING, recipe=RECIPE)
