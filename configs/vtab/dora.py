"""DoRA (Liu et al., ICML 2024) on VTAB-1k: weight-decomposed rank-8 updates of the query and
value projections + head.

    python -m jvt.main --config=configs/vtab/dora.py:task=cifar100 \
        --workdir=runs/final/dora/cifar100

The published protocol per task: the lr x wd grid on train800 -> val200, then 5 seeds on
train800val200 -> test with the best pair:

    python -m jvt.sweep --config=configs/vtab/dora.py:task=cifar100,protocol=vtab_tune \
        --root=runs/tune/dora/cifar100
    python -m jvt.results --root=runs/tune --out=out/tune
    python -m jvt.sweep --config=configs/vtab/dora.py:task=cifar100,lr=LR,wd=WD \
        --root=runs/final/dora/cifar100
    python -m jvt.results --root=runs/final --out=out/final

Expected: no published ViT-B/16 ImageNet-21k VTAB-1k number (the DoRA authors, NVlabs/DoRA,
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
  return common.vtab_config(arg, name="dora", tuning=TUNING, recipe=RECIPE)
