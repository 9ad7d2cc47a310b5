"""VP, visual prompting (Bahng et al. 2022) on FGVC: a learnable 30-pixel frame added to the
224x224 input image + head.

    python -m jvt.main --config=configs/fgvc/vp.py:task=cub,data_dir=/data/fgvc \
        --workdir=runs/fgvc/vp/cub

Protocol `fgvc`: train -> test at the epoch of best val accuracy, 5 seeds. The lr x wd grid
runs with `sweep=grid`, then the seeds with the best pair:

    python -m jvt.sweep \
        --config=configs/fgvc/vp.py:task=cub,data_dir=/data/fgvc,sweep=grid \
        --root=runs/fgvc_grid/vp/cub
    python -m jvt.sweep \
        --config=configs/fgvc/vp.py:task=cub,data_dir=/data/fgvc,lr=LR,wd=WD \
        --root=runs/fgvc/vp/cub
    python -m jvt.results --root=runs/fgvc --out=out/fgvc

Expected: Bahng et al. publish VP with CLIP and ImageNet-1k backbones, not with ViT-B/16
ImageNet-21k on FGVC; no published number is recorded. Compare with VPT-Shallow, the
token-space counterpart, run the same way.

Recipe: the authors train the frame alone (SGD lr 40, momentum 0.9, no weight decay, 1000
warm-up steps, cosine, 1000 epochs) against a frozen classifier (CLIP's text prompts, or the
pretrained model's own labels); here the new head trains with the frame, so jvt uses VPT's SGD
protocol, whose base-lr grid {50 ... 0.05} (x batch / 256) spans the authors' rate. Frame drawn
from N(0, 1) as the authors' `torch.randn`; `pad=N` changes its width.
"""
from configs import common

TUNING = dict(method="vp", pad=30)
RECIPE = common.SGD_FGVC
PUBLISHED = None  # no published ViT-B/16 ImageNet-21k number


def get_config(arg=None):
  return common.fgvc_config(arg, name="vp", tuning=TUNING, recipe=RECIPE)
