"""Linear probe on VTAB-1k: a new head on the frozen ViT-B/16 [CLS] feature.

    python -m jvt.main --config=configs/vtab/linear.py:task=cifar100 \
        --workdir=runs/final/linear/cifar100

The published protocol per task: the lr x wd grid on train800 -> val200, then 5 seeds on
train800val200 -> test with the best pair (`jvt.results` writes it to best_hparams.json):

    python -m jvt.sweep --config=configs/vtab/linear.py:task=cifar100,protocol=vtab_tune \
        --root=runs/tune/linear/cifar100
    python -m jvt.results --root=runs/tune --out=out/tune
    python -m jvt.sweep --config=configs/vtab/linear.py:task=cifar100,lr=LR,wd=WD \
        --root=runs/final/linear/cifar100
    python -m jvt.results --root=runs/final --out=out/final

Expected: over the 19 tasks, the mean of the three group means should reach the published
57.64 (VPT's "Linear" baseline, ViT-B/16 ImageNet-21k, `pretrained=ViT-B_16.npz`).

Recipe (VPT's linear probe): SGD momentum 0.9, cosine, 10 warm-up epochs of 100, base lr x
batch / 256 with base lr in {50 ... 0.05} and wd in {0.01, 0.001, 1e-4, 0} chosen per task
(40 runs); batch 64 (VPT used 1024, more than VTAB-1k's 1000 images; the lr rule scales the
rate).
"""
from configs import common

TUNING = dict(method="linear")
RECIPE = common.SGD_VTAB
PUBLISHED = 57.64  # VTAB-1k mean of the three group means (%)


def get_config(arg=None):
  return common.vtab_config(arg, name="linear", tuning=TUNING, recipe=RECIPE)
