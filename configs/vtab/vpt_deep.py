"""VPT-Deep (Jia et al., ECCV 2022) on VTAB-1k: M prompts per block + head on a frozen ViT-B/16.

    python -m jvt.main --config=configs/vtab/vpt_deep.py:task=cifar100 \
        --workdir=runs/final/vpt_deep/cifar100

The published protocol per task: the lr x wd x prompt-length grid on train800 -> val200 (240
runs), then 5 seeds on train800val200 -> test with the best triple (`jvt.results` writes it to
best_hparams.json, ties broken as VPT's tune_vtab.py: the smaller lr):

    python -m jvt.sweep --config=configs/vtab/vpt_deep.py:task=cifar100,protocol=vtab_tune \
        --root=runs/tune/vpt_deep/cifar100
    python -m jvt.results --root=runs/tune --out=out/tune
    python -m jvt.sweep \
        --config=configs/vtab/vpt_deep.py:task=cifar100,lr=LR,wd=WD,num_prompts=N \
        --root=runs/final/vpt_deep/cifar100
    python -m jvt.results --root=runs/final --out=out/final

Expected: over the 19 tasks, the mean of the three group means should reach the published
71.96 (ViT-B/16 ImageNet-21k, `pretrained=ViT-B_16.npz`). 100 epochs on 1000 images take a few
minutes per run on one GPU.

Recipe (VPT): SGD momentum 0.9, cosine, 10 warm-up epochs of 100, base lr x batch / 256 with
base lr in {50 ... 0.05} and wd in {0.01, 0.001, 1e-4, 0} chosen per task; batch 64 (VPT's
default is 128: the lr rule keeps the per-example rate). Prompts: uniform init
(+-sqrt(6 / (3 * 16 * 16 + 768))), dropout 0.1.
Prompt length: VPT chose it per task from {1, 5, 10, 50, 100, 200}; the tuning grid searches
it with lr and wd (`tuning.num_prompts`: 10 x 4 x 6 = 240 runs per task; ties broken as VPT's
tune_vtab.py does, see docs/benchmark_configs.md); a single run uses 50 (the middle of the
10-100 range VPT's ablation found best) unless given `num_prompts=N`.
"""
from configs import common

TUNING = dict(method="vpt", deep=True, num_prompts=50, dropout=0.1)
RECIPE = common.SGD_VTAB
PUBLISHED = 71.96  # VTAB-1k mean of the three group means (%)


def get_config(arg=None):
  return common.vtab_config(arg, name="vpt_deep", tuning=TUNING, recipe=RECIPE,
                            tune_grid={"tuning.num_prompts": common.VPT_PROMPT_LENGTHS})
