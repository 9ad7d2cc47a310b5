"""DA-VPT host/device helpers: per-class feature means and the class -> prompt mapping."""
from jvt.davpt.kmeans import cosine_kmeans
from jvt.davpt.mapping import accumulate_class_sums
from jvt.davpt.mapping import class_means
from jvt.davpt.mapping import compute_mapping
from jvt.davpt.mapping import finalize_class_means
