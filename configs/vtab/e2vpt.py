"""E2VPT (Han et al., ICCV 2023) on VTAB-1k: deep visual prompts + key-value prompts + head.

    python -m jvt.main --config=configs/vtab/e2vpt.py:task=cifar100 \
        --workdir=runs/final/e2vpt/cifar100

The authors' per-task prompt counts (ChengHan111/E2VPT `command.txt`, "Origin 5runs on
VTAB-1k": `NUM_TOKENS_P` visual, `NUM_TOKENS` key-value prompts) are the defaults, chosen by
`task`; `num_prompts=N` / `num_kv_prompts=N` override them. The published protocol per task:
the lr x wd grid on train800 -> val200, then 5 seeds on train800val200 -> test:

    python -m jvt.sweep --config=configs/vtab/e2vpt.py:task=cifar100,protocol=vtab_tune \
        --root=runs/tune/e2vpt/cifar100
    python -m jvt.results --root=runs/tune --out=out/tune
    python -m jvt.sweep --config=configs/vtab/e2vpt.py:task=cifar100,lr=LR,wd=WD \
        --root=runs/final/e2vpt/cifar100
    python -m jvt.results --root=runs/final --out=out/final

Expected: over the 19 tasks, the mean of the three group means should reach the published
73.94 (ViT-B/16 ImageNet-21k, `pretrained=ViT-B_16.npz`), without pruning (the documented runs
set `MASK_CLS_TOKEN=False`). Pruning is a second stage (docs/methods.md, E2VPT): a rerun with
the same seed and `pruned_prompts` / `pruned_segments` in the tuning dict.

Recipe (VPT's, which E2VPT's tune_vtab follows): SGD momentum 0.9, cosine, 10 warm-up epochs of
100, batch 64, base lr x batch / 256 from {50 ... 0.05} x wd {0.01, 0.001, 0.0001, 0}; dropout
0.1 on the visual prompts (`DROPOUT_P`), none on the key-value prompts, one key-value tensor
shared by keys and values (`SHARE_PARAM_KV`), kaiming-uniform init (`ORIGIN_INIT=2`).
"""
from configs import common

# task -> (visual prompts, key-value prompts), from the authors' command.txt.
TASKS = {
    "cifar100": (5, 5), "caltech101": (32, 5), "dtd": (10, 5), "flowers102": (1, 1),
    "pets": (10, 5), "svhn": (10, 5), "sun397": (10, 5), "patch_camelyon": (10, 10),
    "eurosat": (10, 5), "resisc45": (10, 5), "retinopathy": (10, 5), "clevr_count": (10, 5),
    "clevr_dist": (10, 5), "dmlab": (10, 5), "kitti_dist": (10, 5), "dsprites_loc": (5, 5),
    "dsprites_ori": (5, 5), "smallnorb_azi": (10, 5), "smallnorb_ele": (10, 5),
}
TUNING = dict(method="e2vpt", num_prompts=5, num_kv_prompts=5, dropout=0.1, kv_dropout=0.0)
RECIPE = common.SGD_VTAB
PUBLISHED = 73.94  # VTAB-1k mean of the three group means (%)



def get_config(arg=None):
  prompts, kv = TASKS.get(common.arg_value(arg, "task", "cifar100"), TASKS["cifar100"])
  tuning = dict(TUNING, num_prompts=prompts, num_kv_prompts=kv)
  return common.vtab_config(arg, name="e2vpt", tuning=tuning, recipe=RECIPE)
