"""Knowledge distillation (remapping tuning).

`projection`: the `distill_proj` method (learned maps for feature distillation);
`teacher`: loading a frozen teacher (`load_teacher`); `objective`: distillation's task loss
(`DistillationObjective`, chosen by `config.distill.enabled`); `remap`: initialising a smaller
student from a teacher's weights (`python -m jvt.remap`).

Only the method is imported here: the registry needs it, and the others import the model
factory.
"""
from jvt.methods.distill.projection import DistillProj
