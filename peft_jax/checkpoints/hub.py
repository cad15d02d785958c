"""Weights from the Hugging Face Hub by repository name: ``hf-hub:ORG/NAME[@REVISION]``.

Downloads go through ``huggingface_hub``, so its cache (``HF_HOME`` / ``HF_HUB_CACHE``), its
endpoint (``HF_ENDPOINT``), offline mode (``HF_HUB_OFFLINE=1``) and its token (``HF_TOKEN`` or
``hf auth login``, for gated and private repositories) apply unchanged. A repository is a timm
one (``config.json`` with ``architecture``) or a transformers one (``config.json`` with
``model_type``), with its weights in ``model.safetensors``; the snapshot folder then loads like
any local Hugging Face folder, and `repo_overrides` maps the repository's config onto the model
registry.

Integrity: the Hub stores weights in git LFS and sends the file's sha256 as its ``X-Linked-Etag``;
``huggingface_hub`` names the cached blob after it. Every use hashes the file and compares it with
that name (or with a sha256 pinned in the checkpoint registry); a mismatch removes the file from
the cache and is an error naming it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re

from peft_jax.checkpoints.core import CheckpointError
from peft_jax.models.resnet import RESNET_DEPTHS
from peft_jax.models.vit import VIT_VARIANTS

HUB_PREFIX = "hf-hub:"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A bare ORG/NAME that ends like a file is a missing local path, never a Hub name.
_FILE_SUFFIXES = (".safetensors", ".npz", ".pth", ".pt", ".bin", ".ckpt", ".json", ".npy")

# timm's size names -> the registered ViT whose widths they have.
TIMM_VIT_SIZES = {"tiny": "vit_ti16", "small": "vit_s16", "base": "vit_b16", "large": "vit_l16", "huge": "vit_h14"}
_TIMM_VIT = re.compile(r"vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)")
_TIMM_RESNET = re.compile(r"resnet(\d+)")
_TIMM_POOL = {"token": "token", "avg": "gap"}
_TIMM_VIT_ARGS = {"depth", "img_size", "patch_size", "global_pool", "class_token", "fc_norm", "num_classes"}
_HF_ARCHITECTURES = {"vit": ("ViTForImageClassification", "ViTModel"),
                     "resnet": ("ResNetForImageClassification", "ResNetModel")}
_WIDTHS = ("hidden_size", "num_heads", "mlp_dim")


@dataclasses.dataclass(frozen=True)
class HubName:
    repo_id: str
    revision: str | None = None  # a branch, tag or commit hash; None: the repository's default branch

    def __str__(self) -> str:
        return f"{HUB_PREFIX}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def parse_hub_name(name: str) -> HubName | None:
    """``hf-hub:ORG/NAME[@REV]``; a bare ``ORG/NAME[@REV]`` too, unless it looks like a file path.

    Callers try local paths and registered names first, so a bare name is a Hub name only
    when it is neither.
    """
    explicit = name.startswith(HUB_PREFIX)
    repo_id, _, revision = name.removeprefix(HUB_PREFIX).partition("@")
    if _REPO_ID.fullmatch(repo_id) and not (not explicit and repo_id.lower().endswith(_FILE_SUFFIXES)):
        return HubName(repo_id, revision or None)
    if explicit:
        raise CheckpointError(f"{name!r} is not a Hub name: write hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    return None


def _download(name: HubName, filename: str, *, local_files_only: bool) -> pathlib.Path:
    """One file of the repository through huggingface_hub's cache; its errors become one-line CheckpointErrors."""
    from huggingface_hub import constants, errors, hf_hub_download

    where = f"{name} ({filename})"
    try:
        return pathlib.Path(hf_hub_download(name.repo_id, filename, revision=name.revision,
                                            local_files_only=local_files_only))
    except errors.GatedRepoError as e:
        raise CheckpointError(f"{where}: the repository is gated: accept its terms on the Hub, then log in "
                              "(hf auth login) or set HF_TOKEN") from e
    except errors.RepositoryNotFoundError as e:
        raise CheckpointError(f"{name}: no such repository on {constants.ENDPOINT} (or it is private: log in "
                              "with hf auth login or set HF_TOKEN); if you meant a local path, it does not "
                              "exist") from e
    except errors.RevisionNotFoundError as e:
        raise CheckpointError(f"{name}: the repository has no revision {name.revision!r}") from e
    except errors.RemoteEntryNotFoundError as e:
        raise CheckpointError(f"{name}: the repository has no {filename}; peft_jax reads timm and transformers "
                              f"repositories with {CONFIG_FILE} and {WEIGHTS_FILE}") from e
    except errors.LocalEntryNotFoundError as e:
        why = ("HF_HUB_OFFLINE or PEFT_JAX_OFFLINE is set" if local_files_only or constants.HF_HUB_OFFLINE
               else f"{constants.ENDPOINT} could not be reached")
        raise CheckpointError(f"{where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; "
                              "download it once with network access (HF_HOME or HF_HUB_CACHE choose the cache); "
                              "if you meant a local path, it does not exist") from e
    except (errors.HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{where}: download failed ({type(e).__name__}: {e})") from e


def verify_blob(name: HubName, path: pathlib.Path, sha256: str | None = None) -> None:
    """Checks a cached file against its sha256 (pinned, else the Hub's LFS sha256 that names the blob).

    A mismatch deletes the blob and its snapshot link, so the next run downloads it again.
    """
    blob = pathlib.Path(os.path.realpath(path))
    expected = (sha256 or blob.name).lower()
    source = "the registry's pinned sha256" if sha256 else "the Hub's sha256 (X-Linked-Etag)"
    if not _SHA256.fullmatch(expected):
        raise CheckpointError(f"{name}: the Hub gave no sha256 for {path.name} (not a git LFS file), so it cannot "
                              "be checked; pin one in the checkpoint registry")
    with open(blob, "rb") as f:
        actual = hashlib.file_digest(f, "sha256").hexdigest()
    if actual != expected:
        blob.unlink(missing_ok=True)
        if path.is_symlink():
            path.unlink()
        raise CheckpointError(f"{name}: {path.name} does not match {source}: expected {expected}, got {actual}; "
                              "the file was removed from the cache (rerun to download it again)")


def download_repo(name: HubName, *, sha256: str | None = None, local_files_only: bool = False) -> pathlib.Path:
    """The snapshot folder of a Hub repository holding its verified ``config.json`` and ``model.safetensors``."""
    config = _download(name, CONFIG_FILE, local_files_only=local_files_only)
    weights = _download(name, WEIGHTS_FILE, local_files_only=local_files_only)
    if config.parent != weights.parent:  # the branch moved between the two downloads
        raise CheckpointError(f"{name}: {CONFIG_FILE} and {WEIGHTS_FILE} came from different commits; pin a "
                              "revision (hf-hub:ORG/NAME@COMMIT) or retry")
    verify_blob(name, weights, sha256)
    return weights.parent


def _timm_vit_fields(where: str, config: dict, size: str, patch: int) -> dict:
    args = dict(config.get("model_args") or {})
    unknown = sorted(set(args) - _TIMM_VIT_ARGS)
    if unknown:
        raise CheckpointError(f"{where}: timm model_args {unknown} are not supported by peft_jax's ViT "
                              f"(supported: {sorted(_TIMM_VIT_ARGS)})")
    pool = args.get("global_pool", config.get("global_pool", "token"))
    if pool not in _TIMM_POOL:
        raise CheckpointError(f"{where}: timm global_pool={pool!r} is not supported (supported: {sorted(_TIMM_POOL)})")
    fields = {k: VIT_VARIANTS[TIMM_VIT_SIZES[size]][k] for k in _WIDTHS}
    fields.update(patch_size=int(args.get("patch_size", patch)),
                  depth=int(args.get("depth", VIT_VARIANTS[TIMM_VIT_SIZES[size]]["depth"])), pool=_TIMM_POOL[pool])
    for key in ("class_token", "fc_norm"):
        if key in args:
            fields[key] = bool(args[key])
    return fields


def _hf_vit_fields(config: dict) -> dict:
    """The sizes a transformers ViT config fixes beyond the widths (which `check_hf_config` compares)."""
    return {k: int(config[src]) for k, src in (("depth", "num_hidden_layers"), ("patch_size", "patch_size"))
            if src in config}


def _check_architectures(where: str, config: dict, model_type: str) -> None:
    odd = sorted(set(config.get("architectures") or []) - set(_HF_ARCHITECTURES[model_type]))
    if odd:
        raise CheckpointError(f"{where}: transformers architecture {odd} is not supported "
                              f"(supported: {list(_HF_ARCHITECTURES[model_type])})")


def _fit(where: str, arch: str, fields: dict, overrides: dict) -> dict:
    """Fills the caller's unset ViT options from the repository's; a conflicting one is an error."""
    wanted = {**VIT_VARIANTS[arch], **{k: v for k, v in overrides.items() if v is not None}}
    for key in _WIDTHS:
        if key in fields and wanted[key] != fields[key]:
            fits = [n for n, v in VIT_VARIANTS.items() if all(v[k] == fields[k] for k in _WIDTHS)]
            use = f"use model.name={fits[0]}" if fits else "no registered ViT has these widths"
            raise CheckpointError(f"{where}: the repository's ViT has {key}={fields[key]}, {arch} has "
                                  f"{wanted[key]}; {use}")
    out = dict(overrides)
    for key, value in fields.items():
        if key in _WIDTHS:
            continue
        if overrides.get(key) is not None and overrides[key] != value:
            raise CheckpointError(f"{where}: config.json has {key}={value!r}, the model asks {key}={overrides[key]!r}; "
                                  f"leave model.{key} unset to take the checkpoint's")
        out[key] = value
    return out


def repo_overrides(arch: str, family: str, config: dict, where: str, overrides: dict) -> dict:
    """The model options with what a timm or transformers ``config.json`` says about the network.

    An architecture peft_jax has no model for is an error naming it; one that is another
    registered variant than `arch` is an error naming the variant to use.
    """
    if "architecture" in config:  # timm
        name = config["architecture"]
        vit, resnet = _TIMM_VIT.fullmatch(name), _TIMM_RESNET.fullmatch(name)
        if vit and family == "vit":
            return _fit(where, arch, _timm_vit_fields(where, config, vit[1], int(vit[2])), overrides)
        if resnet and family == "resnet" and int(resnet[1]) in RESNET_DEPTHS:
            if f"resnet{resnet[1]}" != arch:
                raise CheckpointError(f"{where}: timm architecture {name!r} is a resnet{resnet[1]}, not a {arch}; "
                                      f"use model.name=resnet{resnet[1]}")
            return overrides
        raise CheckpointError(f"{where}: timm architecture {name!r} is not supported for {arch} (supported: "
                              "vit_{tiny,small,base,large,huge}_patch<P>_<size>, resnet{18,34,50,101})")
    model_type = config.get("model_type")
    if model_type is None:
        return overrides  # a config.json of another tool: the weights' layout decides
    if model_type not in _HF_ARCHITECTURES or model_type != family:
        raise CheckpointError(f"{where}: transformers model_type {model_type!r} is not supported for {arch} "
                              f"(supported: {sorted(_HF_ARCHITECTURES)})")
    _check_architectures(where, config, model_type)
    return _fit(where, arch, _hf_vit_fields(config), overrides) if family == "vit" else overrides
