"""Adapter+ (Steitz & Roth, CVPR 2024) on VTAB-1k: one adapter after every block with
channel-wise scaling (`adapter` with `placement="adapter_plus"`) + head.

    python -m jvt.main --config=configs/vtab/adapter_plus.py:task=cifar100 \
        --workdir=runs/final/adapter_plus/cifar100

The authors' per-task bottleneck (visinf/adapter_plus `conf/experiment/vtab/
adapter_plus_dim1-32.yaml`) is the default below, chosen by `task`; `dim=N` overrides it
(their single-width runs use `dim=8`). The authors run no per-task lr / wd search: final runs
on train800val200 -> test at the last epoch with the fixed recipe,

    python -m jvt.sweep --config=configs/vtab/adapter_plus.py:task=cifar100 \
        --root=runs/final/adapter_plus/cifar100
    python -m jvt.results --root=runs/final --out=out/final

(`protocol=vtab_tune` runs the lr x wd grid if wanted).

Expected: over the 19 tasks, the mean of the three group means should reach the published
77.6 (ViT-B/16 ImageNet-21k, `pretrained=ViT-B_16.npz`; the authors average 3 seeds).

Recipe (authors' conf/): AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs with 10 warm-up epochs,
cosine (theirs warms up from lr / 100 and ends at lr / 1000); drop-path 0.1 on the adapter;
Houlsby init (truncated normal, std 0.01) of Down and Up. Difference: the authors' backbone has
drop-path 0.1 too (jvt's frozen backbone has none).
"""
from configs import common

# task -> bottleneck width, from the authors' adapter_plus_dim1-32 experiment.
TASKS = {
    "cifar100": 1, "caltech101": 4, "dtd": 2, "flowers102": 1, "pets": 8, "svhn": 16,
    "sun397": 1, "patch_camelyon": 16, "eurosat": 2, "resisc45": 32, "retinopathy": 32,
    "clevr_count": 4, "clevr_dist": 8, "dmlab": 8, "kitti_dist": 8, "dsprites_loc": 32,
    "dsprites_ori": 4, "smallnorb_azi": 32, "smallnorb_ele": 8,
}
TUNING = dict(method="adapter", dim=1, placement="adapter_plus", drop_path=0.1)
RECIPE = common.ADAMW
PUBLISHED = 77.6  # VTAB-1k mean of the three group means (%)



def get_config(arg=None):
  dim = TASKS.get(common.arg_value(arg, "task", "cifar100"), TASKS["cifar100"])
  return common.vtab_config(arg, name="adapter_plus", tuning=dict(TUNING, dim=dim),
                            recipe=RECIPE)
