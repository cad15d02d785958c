"""The CLIP text encoder (Radford et al. 2021) that conditions Stable Diffusion, and its BPE tokenizer.

``encoder(input_ids)`` returns the last hidden state after the final LayerNorm (B, 77, D),
which is what the U-Net cross-attends to. The module tree mirrors the transformers
checkpoints (``encoder/layers/3/self_attn/q_proj``). The tokenizer is built with the
``tokenizers`` package from a ``tokenizer/`` folder (``tokenizer.json``, or ``vocab.json``
plus ``merges.txt``) and pads every prompt to the model's 77 positions.
"""
from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peft_jax.errors import UserError
from peft_jax.files import read_json
from peft_jax.models.diffusion.layers import attention, linear

Dtype = jnp.dtype


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a transformers ``text_encoder/config.json`` (defaults: SD 1.x, OpenAI CLIP ViT-L/14)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # SD 2.x (OpenCLIP ViT-H) uses "gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    dtype: str = "float32"


ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


class Embeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, embedding_init=init, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype,
                                            embedding_init=init, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(input_ids.shape[1]))[None]


class SelfAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            linear(d, d, dtype=dtype, rngs=rngs) for _ in range(4))

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, mask))


class Mlp(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        eps = cfg.layer_norm_eps
        self.layer_norm1 = nnx.LayerNorm(cfg.hidden_size, epsilon=eps, dtype=dtype, rngs=rngs)
        self.self_attn = SelfAttention(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm2 = nnx.LayerNorm(cfg.hidden_size, epsilon=eps, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([EncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class CLIPTextModel(nnx.Module):
    """Token ids (B, L) -> last hidden state (B, L, D); ``pooled`` gives the end-of-text features."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        if cfg.hidden_act not in ACTIVATIONS:
            raise UserError(f"CLIP text: unsupported hidden_act {cfg.hidden_act!r}; valid: {sorted(ACTIVATIONS)}")
        self.config = cfg
        dtype = jnp.dtype(cfg.dtype)
        self.embeddings = Embeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        self.final_layer_norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Causal self-attention; ``attention_mask`` (B, L), 1 for real tokens, also hides padding keys."""
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(f"CLIP text: {length} tokens, at most {self.config.max_position_embeddings}")
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        x = self.encoder(self.embeddings(input_ids), mask)
        return self.final_layer_norm(x).astype(jnp.float32)

    def pooled(self, input_ids: jax.Array, hidden: jax.Array) -> jax.Array:
        """The features at each prompt's first end-of-text token (old configs with eos id 2: the largest id)."""
        if self.config.eos_token_id == 2:
            idx = jnp.argmax(input_ids, axis=-1)
        else:
            idx = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
        return hidden[jnp.arange(hidden.shape[0]), idx]


class CLIPTokenizer:
    """CLIP's byte-level BPE with ``</w>`` word ends, lower-cased, padded and truncated to ``max_length``."""

    SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

    def __init__(self, tokenizer, *, max_length: int, pad_token: str):
        self.tokenizer = tokenizer
        self.max_length = max_length
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise UserError(f"CLIP tokenizer: pad token {pad_token!r} is not in the vocabulary")
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)

    @classmethod
    def from_dir(cls, path: str | pathlib.Path) -> "CLIPTokenizer":
        """Reads a diffusers ``tokenizer/`` folder (its settings from ``tokenizer_config.json`` when present)."""
        from tokenizers import Tokenizer

        path = pathlib.Path(path)
        settings = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (path / name).is_file():
                settings.update(read_json(path / name, "download the tokenizer files again"))

        def token(key: str, default: str) -> str:
            value = settings.get(key, default)
            return value["content"] if isinstance(value, dict) else value

        if (path / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            tok = cls._from_vocab(path / "vocab.json", path / "merges.txt", token("unk_token", "<|endoftext|>"),
                                  token("bos_token", "<|startoftext|>"), token("eos_token", "<|endoftext|>"))
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json, nor vocab.json with merges.txt")
        max_length = int(settings.get("model_max_length", 77))
        if max_length > 10_000:  # transformers writes a huge sentinel when unset
            max_length = 77
        return cls(tok, max_length=max_length, pad_token=token("pad_token", "<|endoftext|>"))

    @classmethod
    def _from_vocab(cls, vocab: pathlib.Path, merges: pathlib.Path, unk: str, bos: str, eos: str):
        from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

        table = read_json(vocab, "download the tokenizer files again")
        lines = merges.read_text(encoding="utf-8").splitlines()
        pairs = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        tok = Tokenizer(models.BPE(table, pairs, unk_token=unk, end_of_word_suffix="</w>", continuing_subword_prefix="",
                                   fuse_unk=False))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(cls.SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.RobertaProcessing(
            (eos, table[eos]), (bos, table[bos]), add_prefix_space=False, trim_offsets=False)
        return tok

    def __call__(self, prompts: str | list[str]) -> np.ndarray:
        """Token ids (N, max_length) int32."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return np.asarray([e.ids for e in self.tokenizer.encode_batch(prompts)], np.int32)
