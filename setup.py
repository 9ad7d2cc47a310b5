"""Installs jvt: parameter-efficient visual tuning of ViTs in JAX/Flax."""
import setuptools

setuptools.setup(
    name="jax-visual-tuning",
    version="0.1.0",
    description="Visual tuning (VPT, DA-VPT, adapters, LoRA, BitFit, SSF, distillation) of ViTs in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["jvt", "jvt.*", "configs", "configs.*"]),
    # The allocator shim jvt.scratch builds on first use (python -m jvt.scratch).
    package_data={"jvt": ["native/*.c"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.0",
        "flax>=0.12.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.0",
        "tensorflow-datasets>=4.9.7",
        "ml-collections>=1.0.0",
        "chex>=0.1.89",
        "numpy>=1.26",
        "safetensors>=0.4.3",
        "grain>=0.2.10",
        "array-record>=0.7.0",
        "absl-py>=2.1.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "pillow>=10.0",
        "psutil>=5.9",
        "ml_dtypes>=0.4",
        "tensorboardX>=2.6",
        "huggingface_hub>=0.34",
    ],
    extras_require={
        "test": ["pytest>=8.0", "scipy>=1.11", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
        # Only for benchmarks/torch_step.py and benchmarks/compare.py (the PyTorch side).
        "bench": ["torch>=2.4", "timm>=1.0"],
    },
)
