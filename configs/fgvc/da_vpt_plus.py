"""DA-VPT+ (DA-VPT with bias tuning) on the five FGVC tasks, with the authors' released values.

    python -m jvt.main --config=configs/fgvc/da_vpt_plus.py:task=cub \
        --workdir=runs/da_vpt_plus/cub --config.dataset.data_dir=/data/fgvc

    python -m jvt.sweep --config=configs/fgvc/da_vpt_plus.py:task=cub --root=runs/da_vpt_plus/cub

arg keys as in configs/fgvc/da_vpt.py, which holds the per-task values `RELEASED` this file
shares.

Expected: the mean test top-1 over the five tasks should reach the published DA-VPT+ FGVC mean
91.94 (ViT-B/16 ImageNet-21k).

Bias set: preset=code trains what the released configs switch on (`bias_k, bias_v, bias_proj,
bias_fc2, bias_norm2, norm_norm1, train_cls`): K, V, attention-out, fc2 and norm2 biases, all
of norm1, [CLS] and, because the released name test matches `patch_embed.proj.bias` as a
`proj.bias`, the patch-embedding bias. preset=paper trains the K and V biases and [CLS] only.
As in the released code (`utils.param_groups_weight_decay`: `cls_token` is neither 1-D nor a
bias), the trained [CLS] gets the prompts' weight decay (`optimizer.decay_cls`).
Every other paper / released-code difference is as in configs/fgvc/da_vpt.py.
"""
from configs.fgvc import da_vpt as _base
RELEASED, NUM_CLASSES = _base.RELEASED, _base.NUM_CLASSES
PUBLISHED = 91.94  # FGVC mean over the five tasks (%)


def get_config(arg=None):
  return _base.make_config(arg, benchmark="fgvc", table=RELEASED, num_classes=NUM_CLASSES,
                           plus=True, default_task="cub")
