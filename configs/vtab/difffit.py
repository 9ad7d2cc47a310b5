"""DiffFit (Xie et al., ICCV 2023) on VTAB-1k: biases, layer norms and a per-block scale on the
attention and MLP branches + head.

    python -m jvt.main --config=configs/vtab/difffit.py:task=cifar100 \
        --workdir=runs/final/difffit/cifar100

The published protocol per task: the lr x wd grid on train800 -> val200, then 5 seeds on
train800val200 -> test with the best pair:

    python -m jvt.sweep --config=configs/vtab/difffit.py:task=cifar100,protocol=vtab_tune \
        --root=runs/tune/difffit/cifar100
    python -m jvt.results --root=runs/tune --out=out/tune
    python -m jvt.sweep --config=configs/vtab/difffit.py:task=cifar100,lr=LR,wd=WD \
        --root=runs/final/difffit/cifar100
    python -m jvt.results --root=runs/final --out=out/final

Expected: no published ViT-B/16 ImageNet-21k VTAB-1k number (DiffFit is published for
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
  return common.vtab_config(arg, name="difffit", tuning=TUNING, recipe=RECIPE)
