"""E2VPT (Han et al., ICCV 2023) on FGVC: deep visual prompts + key-value prompts + head.

    python -m jvt.main --config=configs/fgvc/e2vpt.py:task=cub,data_dir=/data/fgvc \
        --workdir=runs/fgvc/e2vpt/cub

Protocol `fgvc`: train -> test at the epoch of best val accuracy, 5 seeds. The lr x wd grid
runs with `sweep=grid` (pick the pair with the best val accuracy, as VPT's tune_fgvc did),
then the seeds with that pair:

    python -m jvt.sweep \
        --config=configs/fgvc/e2vpt.py:task=cub,data_dir=/data/fgvc,sweep=grid \
        --root=runs/fgvc_grid/e2vpt/cub
    python -m jvt.sweep \
        --config=configs/fgvc/e2vpt.py:task=cub,data_dir=/data/fgvc,lr=LR,wd=WD \
        --root=runs/fgvc/e2vpt/cub
    python -m jvt.results --root=runs/fgvc --out=out/fgvc

Expected: the mean test top-1 over the five tasks (cub, nabirds, flowers, dogs, cars) should
reach the published 89.22 (ViT-B/16 ImageNet-21k, `pretrained=ViT-B_16.npz`, VPT's json
splits under `data_dir`).

Recipe (the authors' command.txt for FGVC, VPT's SGD protocol): SGD momentum 0.9, cosine, 10
warm-up epochs of 100, batch 128, base lr x batch / 256 from {50 ... 0.05} x wd {0.01, 0.001,
0.0001, 0}; 5 visual and 5 key-value prompts per block, dropout 0.1 on the visual prompts.
"""
from configs import common

TUNING = dict(method="e2vpt", num_prompts=5, num_kv_prompts=5, dropout=0.1, kv_dropout=0.0)
RECIPE = common.SGD_FGVC
PUBLISHED = 89.22  # FGVC mean of the five tasks (%)


def get_config(arg=None):
  return common.fgvc_config(arg, name="e2vpt", tuning=TUNING, recipe=RECIPE)
