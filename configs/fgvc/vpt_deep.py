"""VPT-Deep (Jia et al., ECCV 2022) on FGVC: M prompts per block + head on a frozen ViT-B/16.

    python -m jvt.main --config=configs/fgvc/vpt_deep.py:task=cub,data_dir=/data/fgvc \
        --workdir=runs/fgvc/vpt_deep/cub

Protocol `fgvc`: train -> test at the epoch of best val accuracy, 5 seeds. The lr x wd x
prompt-length grid runs with `sweep=grid` (pick the triple whose final_metrics.json has the best
val_accuracy; `jvt.protocols.pick_best` breaks ties as VPT's tune_vtab.py: the smaller lr),
then the seeds with that triple:

    python -m jvt.sweep \
        --config=configs/fgvc/vpt_deep.py:task=cub,data_dir=/data/fgvc,sweep=grid \
        --root=runs/fgvc_grid/vpt_deep/cub
    python -m jvt.sweep \
        --config=configs/fgvc/vpt_deep.py:task=cub,data_dir=/data/fgvc,lr=LR,wd=WD,num_prompts=N \
        --root=runs/fgvc/vpt_deep/cub
    python -m jvt.results --root=runs/fgvc --out=out/fgvc

Expected: the mean test top-1 over the five tasks (cub, nabirds, flowers, dogs, cars) should
reach the published 89.11 (ViT-B/16 ImageNet-21k, `pretrained=ViT-B_16.npz`, VPT's json
splits under `data_dir`).

Recipe (VPT, `configs/base-prompt.yaml`): SGD momentum 0.9, cosine, 10 warm-up epochs of 100,
batch 128, base lr x batch / 256 with base lr in {50 ... 0.05} and wd in {0.01, 0.001, 1e-4, 0}
chosen per task. Prompts: uniform init, dropout 0.1.
Prompt length: VPT chose it per task from {1, 5, 10, 50, 100, 200}; the tuning grid searches
it with lr and wd (`tuning.num_prompts`: 10 x 4 x 6 = 240 runs per task; ties broken as VPT's
tune_vtab.py does, see docs/benchmark_configs.md); a single run uses 50 (the middle of the
10-100 range VPT's ablation found best) unless given `num_prompts=N`.
"""
from configs import common

TUNING = dict(method="vpt", deep=True, num_prompts=50, dropout=0.1)
RECIPE = common.SGD_FGVC
PUBLISHED = 89.11  # FGVC mean test top-1 over the five tasks (%)


def get_config(arg=None):
  return common.fgvc_config(arg, name="vpt_deep", tuning=TUNING, recipe=RECIPE,
                            tune_grid={"tuning.num_prompts": common.VPT_PROMPT_LENGTHS})
