"""DA-VPT+ (DA-VPT with bias tuning) on VTAB-1k, with the authors' released per-task values.

    python -m jvt.main --config=configs/vtab/da_vpt_plus.py:task=cifar100 \
        --workdir=runs/da_vpt_plus/cifar100 --config.dataset.data_dir=~/tensorflow_datasets

    python -m jvt.sweep --config=configs/vtab/da_vpt_plus.py:task=cifar100 \
        --root=runs/da_vpt_plus/cifar100

arg keys as in configs/vtab/da_vpt.py, which holds the per-task values `RELEASED` this file
shares.

Expected: over the 19 tasks the mean of the three group means should reach the published
DA-VPT+ VTAB-1k 76.14 (ViT-B/16 ImageNet-21k); 16 tasks have released values, svhn, sun397 and
kitti_dist run with borrowed values that are NOT THE AUTHORS' (see configs/vtab/da_vpt.py).

Bias set: preset=code trains what each released config switches on: V, attention-out, fc2 and
norm2 biases, all of norm1, [CLS], the patch-embedding bias (matched by the released
`proj.bias` name test) and, where `bias_k` is true, the K biases (the K bias is frozen on
patch_camelyon, eurosat, resisc45, retinopathy, clevr_count, clevr_dist, dmlab, dsprites_ori,
smallnorb_azi through a `rules` entry). preset=paper trains the K and V biases and [CLS]. As in
the released code, the trained [CLS] gets the prompts' weight decay (`optimizer.decay_cls`).
Stochastic depth and every other paper / released-code difference are as in
configs/vtab/da_vpt.py.
"""
from configs import common
from configs.vtab import da_vpt as _vtab
RELEASED, BORROWED, NUM_CLASSES = _vtab.RELEASED, _vtab.BORROWED, _vtab.NUM_CLASSES
PUBLISHED = 76.14  # VTAB-1k mean of the three group means (%)


def get_config(arg=None):
  c = _vtab._base.make_config(arg, benchmark="vtab", table={**RELEASED, **BORROWED},
                              num_classes=NUM_CLASSES, plus=True, default_task="cifar100")
  c.model.drop_path_rate = _vtab.drop_path_rate(common.arg_value(arg, "task", "cifar100"))
  return c
