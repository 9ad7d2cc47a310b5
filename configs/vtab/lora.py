"""LoRA (Hu et al., ICLR 2022) on VTAB-1k: rank-8 updates of the query and value projections + head.

    python -m jvt.main --config=configs/vtab/lora.py:task=cifar100 \
        --workdir=runs/final/lora/cifar100

The published protocol per task: the lr x wd grid on train800 -> val200, then 5 seeds on
train800val200 -> test with the best pair (`jvt.results` writes it to best_hparams.json):

    python -m jvt.sweep --config=configs/vtab/lora.py:task=cifar100,protocol=vtab_tune \
        --root=runs/tune/lora/cifar100
    python -m jvt.results --root=runs/tune --out=out/tune
    python -m jvt.sweep --config=configs/vtab/lora.py:task=cifar100,lr=LR,wd=WD \
        --root=runs/final/lora/cifar100
    python -m jvt.results --root=runs/final --out=out/final

Expected: over the 19 tasks, the mean of the three group means should reach the published
74.5 (ViT-B/16 ImageNet-21k, `pretrained=ViT-B_16.npz`).

Recipe (NOAH's VTAB-1k practice): AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs with 10 warm-up
epochs, cosine; the tuning stage searches lr in {1e-2 ... 1e-4} x wd in {1e-2, 1e-3, 1e-4, 0}
(20 runs). A random (small normal), B zero, scale alpha / r = 1; `rank=N`, `alpha=X` change
them. The update merges into the frozen kernels: the run's export/merged_vit.npz is a plain
ViT-B/16.
"""
from configs import common

TUNING = dict(method="lora", rank=8, alpha=8.0, targets=("query", "value"))
RECIPE = common.ADAMW
PUBLISHED = 74.5  # VTAB-1k mean of the three group means (%)


def get_config(arg=None):
  return common.vtab_config(arg, name="lora", tuning=TUNING, recipe=RECIPE)
