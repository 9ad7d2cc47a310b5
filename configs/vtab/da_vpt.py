"""DA-VPT (Ren et al., CVPR 2025) on VTAB-1k, with the authors' released per-task values.

    python -m jvt.main --config=configs/vtab/da_vpt.py:task=cifar100 \
        --workdir=runs/da_vpt/cifar100 --config.dataset.data_dir=~/tensorflow_datasets

    python -m jvt.sweep --config=configs/vtab/da_vpt.py:task=cifar100 --root=runs/da_vpt/cifar100

arg keys as in configs/fgvc/da_vpt.py (task=<one of RELEASED>, protocol=vtab_final:
train800val200 -> test at the last epoch; `vtab_legacy_max_test` is what the released code
reports; plus `lists` for NOAH-format folders).

Expected: over the 19 tasks the mean of the three group means should reach the published
DA-VPT VTAB-1k 74.69 (ViT-B/16 ImageNet-21k); 100 epochs of batch 32 on 1000 images take a few
minutes per task on one GPU. Every released config also switches bias tuning on (DA-VPT+): this
file runs their values without it, `da_vpt_plus.py` with it (published 76.14).

svhn, sun397 and kitti_dist: the released configs cover 16 tasks. These three run with values
that are NOT THE AUTHORS': `BORROWED` copies every value of the nearest released task of the same
VTAB group (svhn <- cifar100, sun397 <- caltech101, kitti_dist <- clevr_dist; reasons beside
`BORROWED_FROM`), and their tuning stage searches lr x patch_weight x cls_weight (27 runs on
train800 -> val200) around them:

    python -m jvt.sweep --config=configs/vtab/da_vpt.py:task=svhn,protocol=vtab_tune \
        --root=runs/tune/da_vpt/svhn
    python -m jvt.results --root=runs/tune --out=out/tune
    python -m jvt.sweep \
        --config=configs/vtab/da_vpt.py:task=svhn,lr=LR,patch_weight=P,cls_weight=C \
        --root=runs/final/da_vpt/svhn

`RELEASED` holds, per task, the values of Noahsark/DA-VPT `configs/vtab/vitb_*.yaml` as that
code reads them (fields as in configs/fgvc/da_vpt.py, which also holds the shared builder).
Choices where the released files differ from what their code reads (docs/davpt.md):
  * caltech101, dtd, pets use ignored keys (`vpt_and_cls_loss_weight`, `num_last_prompts`,
    `prompt_depth`): read by their evident intent (both weights, num_proxy_prompts, block 11);
  * cifar100 and resisc45 give `proxy_prompt_depth` (ignored by the parser, which then runs
    blocks start..11): read as blocks start..start+depth-1 (cifar100 3-7, resisc45 0-4);
  * smallnorb_ele's file is cut off after `sched_on_updates`: the parser's defaults fill the
    rest (wd 0.01, head_wd 3, patch_weight 0, 10 proxy prompts);
  * legacy `key_patch_emb`, `key_vpt_emb`, `query_vpt_emb` switches are ignored by the
    released code, and here;
  * tasks with fewer classes than proxy prompts (patch_camelyon 2, retinopathy 5, dmlab 6,
    clevr_count 8, smallnorb_ele 9) get num_proxy_prompts = classes, as the released code does;
  * a class-balanced batch of 32 with 2 images per class needs 16 classes: tasks with fewer
    take more images per class (jvt's sampler draws distinct classes, the released one repeats
    them).
  * warmup_lr / min_lr are 1e-8 / 1e-9 except flowers102 and dsprites_loc (1e-7 / 1e-8) and
    smallnorb_ele (min_lr 1e-8, the parser's warmup_lr 1e-7).
Stochastic depth as released: `drop_path` 0.1 on caltech101, cifar100, clevr_count, clevr_dist,
dmlab, dtd, pets, smallnorb_azi (`DROP_PATH`; 0 or absent in the other files), as
`model.drop_path_rate` (the rate linear over depth, as the released `models/vpt.py`); the
borrowed tasks take their source task's.
Paper / released-code differences (preset=code, the default) and the released training recipe
(timm's per-update cosine, [CLS] decay in DA-VPT+): see configs/fgvc/da_vpt.py. The
preprocess is the released VTAB transform `da_vpt_vtab` (bicubic shorter-side resize to 224 +
center crop). Not reproduced: fp16 autocast.
"""
from configs import common
from configs.fgvc import da_vpt as _base
from jvt.data import vtab
released = _base.released

RELEASED = {
    "caltech101": released(lr=5e-3, wd=0.05, head_wd=5.0, patch_weight=0.01, cls_weight=0.01,
                           num_prompts=60, num_proxy_prompts=20, refresh_from_epoch=11),
    "cifar100": released(lr=5e-3, wd=1.0, head_wd=20.0, patch_weight=1.0, cls_weight=0.05,
                         num_prompts=20, num_proxy_prompts=20, proxy_layers=(3, 4, 5, 6, 7),
                         scale_ratio=5.0, refresh_from_epoch=2),
    "dtd": released(lr=1e-3, wd=0.05, head_wd=5.0, patch_weight=0.02, cls_weight=0.02,
                    num_prompts=10, num_proxy_prompts=10, scale_ratio=5.0, refresh_from_epoch=11),
    "flowers102": released(lr=1e-3, wd=0.5, head_wd=3.0, patch_weight=0.1, cls_weight=0.1,
                           num_prompts=40, num_proxy_prompts=10, scale_ratio=5.0,
                           refresh_from_epoch=11, warmup_lr=1e-7, min_lr=1e-8),
    "pets": released(lr=1e-3, wd=0.05, head_wd=5.0, patch_weight=0.1, cls_weight=0.1,
                     num_prompts=5, num_proxy_prompts=10, scale_ratio=10.0, refresh_from_epoch=11),
    "patch_camelyon": released(lr=5e-3, wd=10.0, head_wd=5.0, patch_weight=0.01, cls_weight=0.01,
                               num_prompts=0, num_proxy_prompts=10, scale_ratio=5.0,
                               refresh_from_epoch=2, bias_k=False),
    "eurosat": released(lr=5e-4, wd=5.0, head_wd=5e-3, patch_weight=0.5, cls_weight=0.01,
                        num_prompts=20, num_proxy_prompts=10, proxy_layers=(9, 10, 11),
                        scale_ratio=5.0, refresh_from_epoch=2, bias_k=False),
    "resisc45": released(lr=5e-3, wd=1e-4, head_wd=1.0, patch_weight=0.01, cls_weight=0.05,
                         num_prompts=20, num_proxy_prompts=10, proxy_layers=(0, 1, 2, 3, 4),
                         scale_ratio=5.0, refresh_from_epoch=2, bias_k=False),
    "retinopathy": released(lr=1e-3, wd=0.1, head_wd=1.0, patch_weight=0.01, cls_weight=0.01,
                            num_prompts=20, num_proxy_prompts=10, scale_ratio=5.0,
                            refresh_from_epoch=2, bias_k=False),
    "clevr_count": released(lr=1e-3, wd=0.01, head_wd=10.0, patch_weight=0.5, cls_weight=0.5,
                            num_prompts=10, num_proxy_prompts=10, refresh_from_epoch=2,
                            bias_k=False),
    "clevr_dist": released(lr=5e-5, wd=1e-3, head_wd=0.5, patch_weight=0.01, cls_weight=0.01,
                           num_prompts=10, num_proxy_prompts=5, scale_ratio=5.0,
                           refresh_from_epoch=2, bias_k=False),
    "dmlab": released(lr=5e-3, wd=0.0, head_wd=0.05, patch_weight=0.01, cls_weight=0.01,
                      num_prompts=10, num_proxy_prompts=10, scale_ratio=5.0, refresh_from_epoch=2,
                      bias_k=False),
    "dsprites_loc": released(lr=1e-2, wd=0.5, head_wd=3.0, patch_weight=0.1, cls_weight=0.1,
                             num_prompts=10, num_proxy_prompts=10, scale_ratio=5.0,
                             refresh_from_epoch=11, warmup_lr=1e-7, min_lr=1e-8),
    "dsprites_ori": released(lr=1e-2, wd=1e-3, head_wd=1e-4, patch_weight=0.01, cls_weight=0.01,
                             num_prompts=20, num_proxy_prompts=10, proxy_layers=tuple(range(3, 12)),
                             scale_ratio=5.0, refresh_from_epoch=2, bias_k=False),
    "smallnorb_azi": released(lr=1e-3, wd=1.0, head_wd=1.0, patch_weight=0.01, cls_weight=0.01,
                              num_prompts=20, num_proxy_prompts=10, scale_ratio=5.0,
                              refresh_from_epoch=2, bias_k=False),
    "smallnorb_ele": released(lr=5e-5, wd=0.01, head_wd=3.0, patch_weight=0.0, cls_weight=0.1,
                              num_prompts=5, num_proxy_prompts=10, scale_ratio=5.0,
                              refresh_from_epoch=11, warmup_lr=1e-7, min_lr=1e-8),
}

# NOT THE AUTHORS' VALUES. The released configs cover 16 tasks; for a 19-task VTAB mean the
# other three borrow every value of the nearest released task of their VTAB group, and their
# tuning stage (protocol=vtab_tune) searches lr x patch_weight x cls_weight around them:
#   svhn       <- cifar100    natural; both are 32 x 32 images upsampled to 224
#   sun397     <- caltech101  natural; the released task with the most classes (102) at native
#                             resolution (sun397 has 397)
#   kitti_dist <- clevr_dist  structured; the other distance-bucket task
BORROWED_FROM = {"svhn": "cifar100", "sun397": "caltech101", "kitti_dist": "clevr_dist"}
BORROWED_GRID = {"optimizer.lr": (5e-3, 1e-3, 5e-4), "tuning.patch_weight": (0.01, 0.1, 0.5),
                 "tuning.cls_weight": (0.01, 0.05, 0.1)}
BORROWED = {task: {**RELEASED[source], "tune": BORROWED_GRID}
            for task, source in BORROWED_FROM.items()}
NUM_CLASSES = {task: vtab.VTAB_TASKS[task].num_classes for task in {**RELEASED, **BORROWED}}
# `drop_path` of Noahsark/DA-VPT configs/vtab/vitb_<task>.yaml (0 or absent elsewhere); a
# borrowed task takes its source task's.
DROP_PATH = {task: 0.1 for task in ("caltech101", "cifar100", "clevr_count", "clevr_dist", "dmlab",
                                    "dtd", "pets", "smallnorb_azi")}


def drop_path_rate(task: str) -> float:
  return DROP_PATH.get(BORROWED_FROM.get(task, task), 0.0)
PUBLISHED = 74.69  # VTAB-1k mean of the three group means (%)


def get_config(arg=None):
  c = _base.make_config(arg, benchmark="vtab", table={**RELEASED, **BORROWED},
                        num_classes=NUM_CLASSES, plus=False, default_task="cifar100")
  c.model.drop_path_rate = drop_path_rate(common.arg_value(arg, "task", "cifar100"))
  return c
