"""SSF (Lian et al., NeurIPS 2022) on VTAB-1k: per-channel scale and shift of every operation.

    python -m jvt.main --config=configs/vtab/ssf.py:task=cifar100 \
        --workdir=runs/final/ssf/cifar100

The published protocol per task: the lr x wd grid on train800 -> val200, then 5 seeds on
train800val200 -> test with the best pair (`jvt.results` writes it to best_hparams.json):

    python -m jvt.sweep --config=configs/vtab/ssf.py:task=cifar100,protocol=vtab_tune \
        --root=runs/tune/ssf/cifar100
    python -m jvt.results --root=runs/tune --out=out/tune
    python -m jvt.sweep --config=configs/vtab/ssf.py:task=cifar100,lr=LR,wd=WD \
        --root=runs/final/ssf/cifar100
    python -m jvt.results --root=runs/final --out=out/final

Expected: over the 19 tasks, the mean of the three group means should reach the published
75.69 (ViT-B/16 ImageNet-21k, `pretrained=ViT-B_16.npz`).

Recipe (NOAH's VTAB-1k practice): AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs with 10 warm-up
epochs, cosine; the tuning stage searches lr in {1e-2 ... 1e-4} x wd in {1e-2, 1e-3, 1e-4, 0}
(20 runs). y = gamma * x + beta (gamma 1, beta 0 at init) after the patch embedding, every
projection and layer norm, and the final norm; it merges into the preceding linear maps (the
run's export/merged_vit.npz is a plain ViT-B/16). Not reproduced: SSF's mixup / label
smoothing / drop-path training options.
"""
from configs import common

TUNING = dict(method="ssf")
RECIPE = common.ADAMW
PUBLISHED = 75.69  # VTAB-1k mean of the three group means (%)


def get_config(arg=None):
  return common.vtab_config(arg, name="ssf", tuning=TUNING, recipe=RECIPE)
