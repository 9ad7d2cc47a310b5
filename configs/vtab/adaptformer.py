"""AdaptFormer (Chen et al., NeurIPS 2022) on VTAB-1k: a parallel adapter beside every MLP + head.

    python -m jvt.main --config=configs/vtab/adaptformer.py:task=cifar100 \
        --workdir=runs/final/adaptformer/cifar100

The published protocol per task: the lr x wd grid on train800 -> val200, then 5 seeds on
train800val200 -> test with the best pair (`jvt.results` writes it to best_hparams.json):

    python -m jvt.sweep --config=configs/vtab/adaptformer.py:task=cifar100,protocol=vtab_tune \
        --root=runs/tune/adaptformer/cifar100
    python -m jvt.results --root=runs/tune --out=out/tune
    python -m jvt.sweep --config=configs/vtab/adaptformer.py:task=cifar100,lr=LR,wd=WD \
        --root=runs/final/adaptformer/cifar100
    python -m jvt.results --root=runs/final --out=out/final

Expected: over the 19 tasks, the mean of the three group means should reach the published
74.75 (ViT-B/16 ImageNet-21k, `pretrained=ViT-B_16.npz`).

Recipe (NOAH's VTAB-1k practice): AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs with 10 warm-up
epochs, cosine; the tuning stage searches lr in {1e-2 ... 1e-4} x wd in {1e-2, 1e-3, 1e-4, 0}
(20 runs). x + MLP(LN x) + 0.1 * Up(ReLU(Down(LN x))), Up zero-initialised; bottleneck 8 (the
small end of AdaptFormer's 8-64; `dim=64`, `scale=X` change them).
"""
from configs import common

TUNING = dict(method="adaptformer", dim=8, scale=0.1)
RECIPE = common.ADAMW
PUBLISHED = 74.75  # VTAB-1k mean of the three group means (%)


def get_config(arg=None):
  return common.vtab_config(arg, name="adaptformer", tuning=TUNING, recipe=RECIPE)
