"""The user cache and checksum-verified downloads into it (datasets and checkpoints alike).

A download goes to a temporary file beside its destination, is hashed while it is written,
and is renamed into place only when its digest matches: an interrupted or corrupt download
never leaves a file that a later run would trust.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
import urllib.error
import urllib.request

_CHUNK = 1 << 20


class ChecksumError(OSError):
    """A downloaded file whose digest is not the published one (it was discarded)."""


def cache_dir(*parts: str) -> pathlib.Path:
    """$PEFT_JAX_CACHE (else ~/.cache/peft_jax), joined with ``parts`` (e.g. a dataset family)."""
    root = pathlib.Path(os.environ.get("PEFT_JAX_CACHE") or pathlib.Path.home() / ".cache" / "peft_jax")
    return root.expanduser().joinpath(*parts)


def file_digest(path: pathlib.Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def download(url: str, dest: pathlib.Path, *, digest: str, algorithm: str = "sha256", manual_hint: str = "",
             progress: bool = True) -> pathlib.Path:
    """Downloads ``url`` (http(s) or file://) to ``dest``, checking its ``algorithm`` digest (the full hex
    digest or a prefix of it, as torchvision publishes).

    Raises ChecksumError on a mismatch and FileNotFoundError when the URL cannot be read, both
    ending with ``manual_hint`` (where to get the file by hand).
    """
    if not digest:
        raise ChecksumError(f"refusing to download {url} without a known {algorithm} to check it against")
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
    tmp = pathlib.Path(tmp_name)
    hasher = hashlib.new(algorithm)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                      disable=not progress) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    hasher.update(chunk)
                    bar.update(len(chunk))
        actual = hasher.hexdigest()
        if not actual.startswith(digest.lower()):
            raise ChecksumError(f"{algorithm} mismatch for {dest.name} downloaded from {url}: expected {digest}, got "
                                f"{actual}; the file was discarded. {manual_hint}".rstrip())
        os.replace(tmp, dest)
    except urllib.error.URLError as e:  # offline, DNS, HTTP errors: say what to fetch and where to put it
        raise FileNotFoundError(f"could not download {dest.name} from {url} ({getattr(e, 'reason', e)}). "
                                f"{manual_hint}".rstrip()) from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest
