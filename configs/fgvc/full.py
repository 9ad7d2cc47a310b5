"""Full fine-tuning on FGVC: every ViT-B/16 parameter + head.

    python -m jvt.main --config=configs/fgvc/full.py:task=cub,data_dir=/data/fgvc \
        --workdir=runs/fgvc/full/cub

Protocol `fgvc`: train -> test at the epoch of best val accuracy, 5 seeds. The lr x wd grid
runs with `sweep=grid` (pick the pair whose final_metrics.json has the best val_accuracy, as
VPT's tune_fgvc did), then the seeds with that pair:

    python -m jvt.sweep \
        --config=configs/fgvc/full.py:task=cub,data_dir=/data/fgvc,sweep=grid \
        --root=runs/fgvc_grid/full/cub
    python -m jvt.sweep \
        --config=configs/fgvc/full.py:task=cub,data_dir=/data/fgvc,lr=LR,wd=WD \
        --root=runs/fgvc/full/cub
    python -m jvt.results --root=runs/fgvc --out=out/fgvc

Expected: the mean test top-1 over the five tasks (cub, nabirds, flowers, dogs, cars) should
reach the published 88.54 (VPT's "Full" baseline, ViT-B/16 ImageNet-21k,
`pretrained=ViT-B_16.npz`, VPT's json splits under `data_dir`).

Recipe (VPT, `configs/base-finetune.yaml`, `tune_fgvc.py`): AdamW, cosine, 5 warm-up epochs
of 100, base lr x batch / 256 with base lr in {0.005, 0.001, 5e-4, 1e-4} and wd in
{0.01, 0.001, 1e-4, 0} chosen per task (16 runs); batch 128 (VPT used 384). Each run stores a
full model (about 340 MB export; `--config.keep_checkpoints=False` drops the checkpoints).
"""
from configs import common

TUNING = dict(method="full")
RECIPE = common.FULL_FGVC
PUBLISHED = 88.54  # FGVC mean test top-1 over the five tasks (%)


def get_config(arg=None):
  return common.fgvc_config(arg, name="full", tuning=TUNING, recipe=RECIPE)
