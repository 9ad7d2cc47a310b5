"""BitFit (Ben Zaken et al., ACL 2022) on VTAB-1k: every bias vector of the ViT-B/16 + head.

    python -m jvt.main --config=configs/vtab/bitfit.py:task=cifar100 \
        --workdir=runs/final/bitfit/cifar100

The published protocol per task: the lr x wd grid on train800 -> val200, then 5 seeds on
train800val200 -> test with the best pair (`jvt.results` writes it to best_hparams.json):

    python -m jvt.sweep --config=configs/vtab/bitfit.py:task=cifar100,protocol=vtab_tune \
        --root=runs/tune/bitfit/cifar100
    python -m jvt.results --root=runs/tune --out=out/tune
    python -m jvt.sweep --config=configs/vtab/bitfit.py:task=cifar100,lr=LR,wd=WD \
        --root=runs/final/bitfit/cifar100
    python -m jvt.results --root=runs/final --out=out/final

Expected: over the 19 tasks, the mean of the three group means should reach the published
65.22 (VPT's "Bias" baseline, ViT-B/16 ImageNet-21k, `pretrained=ViT-B_16.npz`).

Recipe (NOAH's VTAB-1k practice): AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs with 10 warm-up
epochs, cosine; the tuning stage searches lr in {1e-2 ... 1e-4} x wd in {1e-2, 1e-3, 1e-4, 0}
(20 runs). Trains the biases of the patch embedding, q/k/v/out, both MLP layers, both layer
norms of every block and the final norm (`--config.tuning.subset` picks a subset, e.g.
('key', 'value')).
"""
from configs import common

TUNING = dict(method="bitfit")
RECIPE = common.ADAMW
PUBLISHED = 65.22  # VTAB-1k mean of the three group means (%)


def get_config(arg=None):
  return common.vtab_config(arg, name="bitfit", tuning=TUNING, recipe=RECIPE)
