"""Full fine-tuning on VTAB-1k: every ViT-B/16 parameter + head.

    python -m jvt.main --config=configs/vtab/full.py:task=cifar100 \
        --workdir=runs/final/full/cifar100

The published protocol per task: the lr x wd grid on train800 -> val200, then 5 seeds on
train800val200 -> test with the best pair (`jvt.results` writes it to best_hparams.json):

    python -m jvt.sweep --config=configs/vtab/full.py:task=cifar100,protocol=vtab_tune \
        --root=runs/tune/full/cifar100
    python -m jvt.results --root=runs/tune --out=out/tune
    python -m jvt.sweep --config=configs/vtab/full.py:task=cifar100,lr=LR,wd=WD \
        --root=runs/final/full/cifar100
    python -m jvt.results --root=runs/final --out=out/final

Expected: over the 19 tasks, the mean of the three group means should reach the published
68.96 (VPT's "Full" baseline, ViT-B/16 ImageNet-21k, `pretrained=ViT-B_16.npz`).

Recipe (VPT's full fine-tuning): AdamW, cosine, 5 warm-up epochs of 100, base lr x batch / 256
with base lr in {0.005, 0.001, 5e-4, 1e-4} and wd in {0.01, 0.001, 1e-4, 0} chosen per task
(16 runs); batch 64 (VPT used 384 on FGVC). Each run stores a full model: the export is
about 340 MB and the orbax checkpoints hold Adam state too (`--config.keep_checkpoints=False`
removes them after the run).
"""
from configs import common

TUNING = dict(method="full")
RECIPE = common.FULL_VTAB
PUBLISHED = 68.96  # VTAB-1k mean of the three group means (%)


def get_config(arg=None):
  return common.vtab_config(arg, name="full", tuning=TUNING, recipe=RECIPE)
