"""Checksum-verified, atomic downloads into the user cache (for datasets whose license allows it)."""
from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
import urllib.error
import urllib.request

import tqdm


def cache_dir(family: str) -> pathlib.Path:
    """The user cache for one dataset family: $PEFT_JAX_CACHE/<family> or ~/.cache/peft_jax/<family>."""
    root = os.environ.get("PEFT_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "peft_jax")
    return pathlib.Path(root) / family


def md5sum(path: os.PathLike | str, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, destination: pathlib.Path, md5: str, *, manual_hint: str = "") -> pathlib.Path:
    """Downloads `url` to `destination`, verifying its md5.

    The file is written to a temporary name in the destination folder and renamed only once
    the checksum matches, so an interrupted or corrupt download never leaves a file that a
    later run would trust.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    digest = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url) as response:
            total = response.headers.get("Content-Length")
            with tqdm.tqdm(total=int(total) if total else None, unit="B", unit_scale=True, unit_divisor=1024,
                           desc=f"Downloading {destination.name}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        actual = digest.hexdigest()
        if actual != md5:
            raise OSError(
                f"Checksum mismatch for {destination.name} downloaded from {url}: expected md5 {md5}, got {actual}. "
                f"Nothing was written to the cache. {manual_hint}".rstrip())
        os.replace(tmp_name, destination)
    except urllib.error.URLError as e:  # offline, DNS, HTTP errors: say what to fetch and where to put it
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise FileNotFoundError(
            f"could not download {destination.name} from {url} ({getattr(e, 'reason', e)}). "
            f"{manual_hint}".rstrip()) from e
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return destination
