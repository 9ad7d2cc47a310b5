"""Knowledge distillation's public names (implemented in `jvt.methods.distill`)."""
from jvt.methods.distill.objective import FEATURE_TOKENS, DistillationObjective
from jvt.methods.distill.teacher import Teacher, load_teacher
