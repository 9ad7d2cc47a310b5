"""VP, visual prompting (Bahng et al. 2022) on VTAB-1k: a learnable 30-pixel frame added to the
224x224 input image + head.

    python -m jvt.main --config=configs/vtab/vp.py:task=cifar100 \
        --workdir=runs/final/vp/cifar100

The published protocol per task: the lr x wd grid on train800 -> val200, then 5 seeds on
train800val200 -> test with the best pair:

    python -m jvt.sweep --config=configs/vtab/vp.py:task=cifar100,protocol=vtab_tune \
        --root=runs/tune/vp/cifar100
    python -m jvt.results --root=runs/tune --out=out/tune
    python -m jvt.sweep --config=configs/vtab/vp.py:task=cifar100,lr=LR,wd=WD \
        --root=runs/final/vp/cifar100
    python -m jvt.results --root=runs/final --out=out/final

Expected: Bahng et al. publish VP with CLIP and ImageNet-1k backbones, not with ViT-B/16
ImageNet-21k on VTAB-1k; no published number is recorded. Compare with VPT-Shallow, the
token-space counterpart, run the same way.

Recipe: the authors train the frame alone (SGD lr 40, momentum 0.9, no weight decay, 1000
warm-up steps, cosine, 1000 epochs) against a frozen classifier (CLIP's text prompts, or the
pretrained model's own labels); here the new head trains with the frame, so jvt uses VPT's SGD
protocol, whose base-lr grid {50 ... 0.05} (x batch / 256) spans the authors' rate. Frame drawn
from N(0, 1) as the authors' `torch.randn`; `pad=N` changes its width.
"""
from configs import common

TUNING = dict(method="vp", pad=30)
RECIPE = common.SGD_VTAB
PUBLISHED = None  # no published ViT-B/16 ImageNet-21k number


def get_config(arg=None):
  return common.vtab_config(arg, name="vp", tuning=TUNING, recipe=RECIPE)
