#!/usr/bin/env bash
# The GPU table: jvt against PyTorch + timm on one GPU, bf16, ViT-B/16 at batch 128.
#
#   bash benchmarks/gpu.sh OUT_DIR [METHODS] [SECONDS]
#
# Needs a CUDA build of JAX and of torch, and timm (pip install -e ".[bench]"). Prints the
# GPU, the library versions and the card's bf16 matrix rate through XLA (an 8192^3 product,
# the ceiling the MFU column is read against besides the datasheet peak), then runs
# benchmarks/run.py for VPT-Deep and full fine-tuning with `fused_attention` (OUT_DIR/fused),
# then benchmarks/compare.py --device gpu over METHODS (VPT-Deep first: goal 6 of
# docs/performance.md is its MFU) into OUT_DIR/b16/compare.md and compare.json. A method's pair
# is written as soon as it is measured, so a comparison stopped after SECONDS (default 420)
# keeps every finished pair.
set -u
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [METHODS] [SECONDS]}
methods=${2:-vpt_deep,full,da_vpt,lora,adapter,linear,bitfit,ssf}
seconds=${3:-420}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 - <<'EOF'
import importlib.metadata as md
import time
import jax
import jax.numpy as jnp
print({n: md.version(n) for n in ("jax", "jaxlib", "flax", "optax", "chex", "torch", "timm")})
print("jax devices:", jax.devices())
n = 8192
a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in range(2))
mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
mm(a, b).block_until_ready()
t0 = time.perf_counter()
for _ in range(20):
  c = mm(a, b)
c.block_until_ready()
print(f"XLA bf16 {n}^3 product, fp32 accumulation: "
      f"{2 * n**3 * 20 / (time.perf_counter() - t0) / 1e12:.0f} TFLOP/s")
EOF
# jvt alone with attention as one fused kernel (cuDNN's), the model option a user would switch on.
python3 "$here/run.py" --variant B/16 --batch 128 --dtype bfloat16 --steps 20 --warmup 5 \
    --methods vpt_deep,full --overrides '{"fused_attention": true}' --timeout 150 \
    --out "$out/fused"
timeout "$seconds" python3 "$here/compare.py" --device gpu --variant B/16 --batch 128 \
    --dtype bfloat16 --steps 20 --warmup 5 --methods "$methods" --timeout 240 --out "$out/b16"
status=$?
cat "$out/b16/compare.md" 2>/dev/null
exit $status
