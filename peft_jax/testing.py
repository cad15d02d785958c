"""Helpers for tests and benchmarks that compare peft_jax with its references (random torch models, a tiny
Stable Diffusion pipeline, dataset subsets, a local fake Hugging Face Hub).

Plain functions and classes, not pytest fixtures: the test suite calls them with different arguments at
each call site, and benchmarks and a user's own parity checks can import them too. PyTorch,
diffusers and transformers (the test extra) are imported inside the functions that need them.
"""
from __future__ import annotations

import csv
import hashlib
import http.server
import json
import pathlib
import re
import threading
import urllib.parse
from collections.abc import Callable

import numpy as np


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) float32 standard-normal "images" (already normalised inputs)."""
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def randomize_torch(model, std: float, seed: int = 0):
    """A torch reference model with random weights everywhere, norms around 1 and random BatchNorm
    statistics, so that a swapped or skipped tensor in a converter changes the logits; in eval mode."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.2)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
    return model.eval()


def tiny_sd_pipeline(root: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A tiny Stable Diffusion pipeline folder in the diffusers layout, random weights: a one-level U-Net on
    16x16 latents, a VAE downsampling by 2, a CLIP text encoder of width 32, a byte-level tokenizer."""
    import diffusers
    import torch
    import transformers
    from tokenizers import pre_tokenizers

    torch.manual_seed(seed)
    diffusers.UNet2DConditionModel(  # one level: attention in the down, mid and up blocks, little to compile
        sample_size=16, block_out_channels=(32,), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        attention_head_dim=4, norm_num_groups=8).save_pretrained(root / "unet")
    diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
                            layers_per_block=1).save_pretrained(root / "vae")
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=77)).save_pretrained(root / "text_encoder")
    diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            steps_offset=1).save_pretrained(root / "scheduler")
    tok = root / "tokenizer"
    tok.mkdir()
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab.update({"<|startoftext|>": 49406, "<|endoftext|>": 49407})
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    return root


def write_random_images(paths: list[pathlib.Path], fmt: str) -> None:
    """Stand-ins for release images that a test's data folder does not hold: small random pictures."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path, format=fmt)


def csv_subset(src: pathlib.Path, dst: pathlib.Path, keep: Callable[[dict], bool]) -> list[dict]:
    """Writes the header and the rows of the real CSV ``src`` for which ``keep(row)`` is true; returns the rows."""
    with open(src, newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if keep(r)]
        fields = reader.fieldnames
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def iu_xray_subset(shared_data: pathlib.Path, manual: pathlib.Path, num_studies: int) -> tuple[list[dict], dict]:
    """An IU X-ray manual folder in ``manual``: the real projection and report rows of studies 1..num_studies
    and random images in their place; returns (projection rows, reports by uid)."""
    uids = {str(u) for u in range(1, num_studies + 1)}
    projections = csv_subset(shared_data / "iu_xray" / "indiana_projections.csv", manual / "indiana_projections.csv",
                             lambda r: r["uid"] in uids)
    reports = {r["uid"]: r for r in csv_subset(shared_data / "iu_xray" / "indiana_reports.csv",
                                               manual / "indiana_reports.csv", lambda r: r["uid"] in uids)}
    write_random_images([manual / "images" / "images_normalized" / r["filename"] for r in projections], "PNG")
    return projections, reports


# A local stand-in for the Hugging Face Hub: repositories served on 127.0.0.1 in the Hub's URL layout.
#
# ``/{repo}/resolve/{revision}/{file}`` answers HEAD and GET with the headers ``huggingface_hub``
# reads (``X-Repo-Commit``, ``ETag``, and for LFS files ``X-Linked-Etag`` = the sha256 and
# ``X-Linked-Size``), ``/api/models/{repo}/revision/{revision}`` with the repository's file list
# and LFS metadata, and unknown repositories, revisions and files with the Hub's error codes.
# A tampered file is served with other bytes under its true sha256, as a corrupted mirror would.
LFS_SUFFIXES = (".safetensors", ".bin")


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.tampered: set[tuple[str, str]] = set()
        self.requests: list[str] = []
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def add(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Publishes a repository; returns its commit hash."""
        commit = hashlib.sha1(repo_id.encode() + b"".join(sorted(files.values()))).hexdigest()
        self.repos[repo_id] = {"commit": commit, "files": dict(files)}
        return commit

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def lookup(self, repo_id: str, revision: str) -> tuple[int, dict, dict | None]:
        """(status, error headers, repository) for a repository at a revision."""
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, None
        if revision not in ("main", repo["commit"]):
            return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, None
        return 200, {}, repo


def _lfs(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}


def _handler(hub: FakeHub):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, headers: dict, body: bytes = b"") -> None:
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        def _api(self, repo_id: str, revision: str) -> None:
            status, errors, repo = hub.lookup(repo_id, revision)
            if repo is None:
                return self._send(status, errors)
            siblings = [{"rfilename": f, "size": len(d), **({"lfs": _lfs(d)} if f.endswith(LFS_SUFFIXES) else {})}
                        for f, d in sorted(repo["files"].items())]
            body = json.dumps({"id": repo_id, "sha": repo["commit"], "siblings": siblings}).encode()
            self._send(200, {"Content-Type": "application/json"}, body)

        def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
            status, errors, repo = hub.lookup(repo_id, revision)
            if repo is None:
                return self._send(status, errors)
            if filename not in repo["files"]:
                return self._send(404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                                        "X-Repo-Commit": repo["commit"]})
            data = repo["files"][filename]
            headers = {"X-Repo-Commit": repo["commit"], "Accept-Ranges": "bytes"}
            if filename.endswith(LFS_SUFFIXES):
                sha = _lfs(data)["sha256"]
                headers.update({"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))})
            else:
                headers["ETag"] = '"' + hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() + '"'
            if (repo_id, filename) in hub.tampered:
                data = bytes([data[0] ^ 1]) + data[1:]  # same size, same advertised sha256, other bytes
            self._send(200, headers, data)

        def _route(self) -> None:
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
            hub.requests.append(f"{self.command} {path}")
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path):
                return self._api(m[1], m[2])
            if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                return self._resolve(m[1], m[2], m[3])
            self._send(404, {"X-Error-Message": "not found"})

        do_GET = do_HEAD = _route

    return Handler


def peft_config(method: str, **fields):
    """The ``peft`` section of the default config with ``method`` and the given fields set."""
    from peft_jax.config import base_config

    c = base_config().peft
    c.method = method
    c.update(fields)
    return c


def nudge(model, state, seed: int, scale: float) -> None:
    """Adds ``scale`` times a standard normal draw to every leaf of ``state`` (a state of ``model``), so that
    trained-looking values replace an identity initialisation; one compile per size bucket (models/init.py)."""
    import jax
    from flax import nnx

    from peft_jax.models.init import draw

    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    nnx.update(model, jax.tree.map(lambda x: x + scale * draw(jax.random.normal, next(keys), x.shape), state))


def perturb_adapters(model, seed: int = 7, scale: float = 0.05) -> None:
    """Moves the adapter variables away from their initialisation so a merge has something to fold."""
    from flax import nnx

    from peft_jax.adapters import ADAPTER_TYPES

    nudge(model, nnx.state(model, nnx.Any(*ADAPTER_TYPES)), seed, scale)


def randomize_batchnorm(model, seed: int = 5) -> None:
    """Non-trivial BatchNorm statistics and affine parameters and a random head, then eval mode: a CNN on which
    a method that folds into or scales the norms shows it when it gets them wrong."""
    import jax
    from flax import nnx

    from peft_jax.models.init import draw

    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm):
            c = (m.num_features,)
            m.mean[...] = 0.1 * draw(jax.random.normal, next(keys), c)
            m.var[...] = draw(jax.random.uniform, next(keys), c, 0.5, 1.5)
            m.scale[...] = draw(jax.random.uniform, next(keys), c, 0.5, 1.5)
            m.bias[...] = 0.1 * draw(jax.random.normal, next(keys), c)
    model.head.kernel[...] = draw(jax.random.normal, next(keys), model.head.kernel.shape)
    model.eval()


def assert_same_logits(after, before) -> None:
    """Equal to 1e-5, relative to the largest logit."""
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * float(np.abs(np.asarray(before)).max()))


def train_losses(workdir: pathlib.Path) -> list[float]:
    """The logged training loss of every step (metrics.jsonl, one record per logged step)."""
    return [json.loads(line)["loss"] for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
