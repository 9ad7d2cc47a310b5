"""DA-VPT and DA-VPT+: settings and prompt plug-in (`settings`), the loss term with the class ->
prompt mapping state (`objective`), per-class means and the mapping (`mapping`), cosine k-means
(`kmeans`). The metric losses themselves are pure functions in `jvt.losses.da_vpt`."""
from jvt.methods.da_vpt.kmeans import cosine_kmeans
from jvt.methods.da_vpt.mapping import (accumulate_class_sums, class_means, compute_mapping,
                                        finalize_class_means)
from jvt.methods.da_vpt.settings import DAVPT, DAVPTPlus
