"""The experiment configuration: every knob is a field, overridable with ``--config.a.b=v``.

``base_config()`` holds every field with its default; experiment files in ``configs/``
start from it and change what they need. The dict is locked, so a misspelt override is
an error that lists the close valid keys instead of a silently ignored setting.
"""
from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from typing import Any

import ml_collections

from peft_jax.errors import UserError


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dry_run = False
    _model_and_peft(c)
    _data_and_training(c)
    _devices_and_init(c)
    return c


def _model_and_peft(c: ml_collections.ConfigDict) -> None:
    c.model = ml_collections.ConfigDict()
    c.model.name = "vit_b16"
    c.model.image_size = 224
    # Optional architecture overrides (None keeps the registered variant's value).
    c.model.patch_size = ml_collections.config_dict.placeholder(int)
    c.model.depth = ml_collections.config_dict.placeholder(int)
    c.model.pool = ml_collections.config_dict.placeholder(str)
    c.model.scan_layers = False
    # ViTs: recompute block activations in the backward pass. Unset (with remat_policy unset too): the method's
    # measured default (train/builder.py AUTO_REMAT_POLICIES: LoRA recomputes all but the projections).
    c.model.remat = ml_collections.config_dict.placeholder(bool)
    # With remat: what each block keeps for the backward pass (models/vit.py REMAT_POLICIES: nothing_saveable,
    # dots_saveable, dots_with_no_batch_dims_saveable, projections_saveable); None recomputes the whole block.
    c.model.remat_policy = ml_collections.config_dict.placeholder(str)
    # EfficientNet-Lite stochastic depth: the last block's drop rate (None: the reference's 0.2).
    c.model.drop_connect_rate = ml_collections.config_dict.placeholder(float)

    c.peft = ml_collections.ConfigDict()
    c.peft.method = "lora"
    c.peft.rank = 8
    c.peft.alpha = 8.0
    c.peft.targets = "qv"  # preset (qv, qkv, attn, all) or a regex on module paths
    c.peft.ssf_init_std = ml_collections.config_dict.placeholder(float)
    c.peft.num_tokens = 10  # VPT prompt tokens (per layer for vpt_deep)
    c.peft.prompt_dropout = 0.0  # VPT dropout on the prompt tokens (Jia et al.'s default)
    c.peft.bottleneck = 64  # hidden width of adapter_houlsby / adapter_pfeiffer / adaptformer
    # bottleneck adapters' non-linearity: relu, gelu or gelu_tanh (None: the reference's, gelu_tanh for
    # adapter_houlsby, relu for adapter_pfeiffer and adaptformer)
    c.peft.activation = ml_collections.config_dict.placeholder(str)
    c.peft.adapter_norms = True  # adapter_houlsby also trains the LayerNorms, as adapter-bert does
    c.peft.scale = ml_collections.config_dict.placeholder(float)  # adapter output scale (None: the method's default)
    # dropout inside fact/repadapter/convpass/adaptformer (None: 0.1)
    c.peft.dropout = ml_collections.config_dict.placeholder(float)
    c.peft.groups = 2  # RepAdapter's grouped up-projection
    # FacT-TK's MLP cores: "official" (JieShibo/PETL-ViT fact_tk.py, behind the published numbers) or "paper"
    c.peft.fact_tk_mlp = "official"
    # U-Net `attention`: "transformer" (every parameter of the attention blocks, as the seed author's code) or
    # "projections" (the q/k/v/out projections of attn1 and attn2)
    c.peft.attention_scope = "transformer"
    c.peft.tsa_form = "matrix"  # TSA adapters: "matrix" (parallel 1x1 convolution) or "channel" (per-channel scale)
    c.peft.tsa_alignment = False  # TSA: also the pre-classifier alignment (a DxD map of the pooled feature)
    c.peft.reduction = 8  # Conv-Adapter's channel compression gamma (hidden channels = C_in / gamma)
    c.peft.num_blocks = 1  # partial: how many of the last residual blocks fine-tune


def _data_and_training(c: ml_collections.ConfigDict) -> None:
    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "breastmnist"
    c.dataset.data_dir = ml_collections.config_dict.placeholder(str)
    c.dataset.manual_dir = ml_collections.config_dict.placeholder(str)
    c.dataset.config = ml_collections.config_dict.placeholder(str)  # a builder's variant, e.g. rsna three_class
    c.dataset.fraction = 1.0
    c.dataset.size = 28  # MedMNIST resolution of the source .npz (28, 64, 128 or 224)
    c.dataset.download = True
    c.dataset.skip_bad_files = False
    c.dataset.augment = True
    c.dataset.num_workers = 0

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.batch_size = 32
    c.train.eval_batch_size = 128
    c.train.lr = 1e-3
    c.train.weight_decay = 1e-4
    # Parameter groups (peft_jax/train/optim.py): (regex on the variable path, multiplier) pairs, first
    # match wins, unmatched 1.0; e.g. (("^head/", 10.0),) gives the new head 10 x train.lr.
    c.train.lr_mults = ()
    c.train.wd_mults = ()
    c.train.schedule = "warmup_cosine"  # or "constant"
    c.train.warmup_steps = 50
    c.train.grad_clip = 1.0
    c.train.label_smoothing = 0.0
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.train.log_every = 10
    c.train.patience = 10  # evaluations without a better validation macro-F1 before stopping (0: never)
    c.train.bn_stats = "update"  # ResNet BatchNorm running statistics: "update" or "frozen"
    c.train.progress = True
    c.train.compute_dtype = "float32"  # "bfloat16": bf16 activations and matmuls (ViT); parameters stay float32
    # ViT product operands (None: compute_dtype). "bfloat16" with float32 activations: bf16 products
    # accumulating in float32, everything else float32 (the faster bf16 mode on CPUs).
    c.train.matmul_dtype = ml_collections.config_dict.placeholder(str)
    c.train.skip_nonfinite = False  # True: skip (and count) updates whose loss or gradient is NaN/Inf



def _devices_and_init(c: ml_collections.ConfigDict) -> None:
    # Multi-process runs (one process per host): None takes JAX's own detection (SLURM, TPU pods,
    # or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables).
    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False
    c.distributed.coordinator_address = ml_collections.config_dict.placeholder(str)
    c.distributed.num_processes = ml_collections.config_dict.placeholder(int)
    c.distributed.process_id = ml_collections.config_dict.placeholder(int)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = 1
    c.mesh.min_shard_size = 2**14  # smaller variables are replicated
    # Sharding rules tried before the default FSDP rule (peft_jax/sharding.py): (regex, "auto" or a tuple
    # of mesh axes per array axis), e.g. (("pos_embed$", ()),) replicates the position embeddings.
    c.mesh.rules = ()

    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ml_collections.config_dict.placeholder(str)  # path, registered name or hf-hub:ORG/NAME
    # A Hugging Face peft adapter folder (LoRA, DoRA, IA3 for a transformers ViT) to continue training from.
    c.init.adapter = ml_collections.config_dict.placeholder(str)


def tiny_run(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The CPU-sized run of a ``configs/*.py:tiny`` variant: 40 steps on 28 px BreastMNIST (the model is the file's)."""
    c.dataset.name = "breastmnist"
    c.dataset.size = 28
    c.train.num_steps = 40
    c.train.batch_size = 16
    c.train.warmup_steps = 4
    c.train.eval_every = 20
    c.train.checkpoint_every = 20
    c.train.log_every = 10
    return c


def all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        name = f"{prefix}{k}"
        keys.append(name)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(all_keys(v, name + "."))
    return keys


def unknown_key_message(config: ml_collections.ConfigDict, key: str) -> str:
    close = difflib.get_close_matches(key, all_keys(config), n=4, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"unknown config key {key!r}.{hint}"


def check_keys(config: ml_collections.ConfigDict, keys, where: str) -> None:
    """Every dotted key names a field of ``config``; otherwise an error naming the close valid keys."""
    for key in keys:
        node = config
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise UserError(f"{where}: {unknown_key_message(config, key)}")
            node = node[part]


def with_values(config: ml_collections.ConfigDict, values: Mapping[str, Any],
                where: str = "override") -> ml_collections.ConfigDict:
    """A copy of ``config`` with dotted fields set (``{"train.lr": 1e-3}``); unknown keys and wrong types
    are errors naming the field."""
    check_keys(config, values, where)
    new = copy.deepcopy(config)
    for key, value in values.items():
        node = new
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        try:
            node[leaf] = value
        except TypeError as e:
            raise UserError(f"{where}: {key}={value!r} has the wrong type for that field ({e})") from None
    return new


# Fields of the driver sections whose keys are names the user picks (methods, models, datasets).
FREE_FORM = ("sweep.space", "benchmark.overrides")


def experiment_schema(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``base_config()`` with the schema of each driver section (sweep, benchmark) that ``config`` has."""
    schema = base_config()
    if "sweep" in config:
        from peft_jax.hpo.space import sweep_section  # the hpo package imports this module

        schema.sweep = sweep_section()
    if "benchmark" in config:
        from peft_jax.hpo.grid import benchmark_section

        schema.benchmark = benchmark_section("", "", "", "", "")
    return schema


def check_config_keys(config: ml_collections.ConfigDict, where: str, *, schema: ml_collections.ConfigDict | None = None,
                      free: tuple[str, ...] = ()) -> None:
    """Refuses a key that the schema lacks (a typo in a config *file*), as overrides are refused.

    ``schema`` defaults to ``experiment_schema(config)``; the dotted keys in ``free`` (and
    ``FREE_FORM``) hold sections whose keys are not checked (e.g. ``quickstart``).
    """
    schema = experiment_schema(config) if schema is None else schema
    skip = set(free) | set(FREE_FORM)

    def visit(node: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, prefix: str) -> None:
        for key, value in node.items():
            name = prefix + key
            if name in skip:
                continue
            if key not in reference:
                raise UserError(f"{where}: {unknown_key_message(schema, name)}")
            if isinstance(value, ml_collections.ConfigDict) and isinstance(reference[key], ml_collections.ConfigDict):
                visit(value, reference[key], name + ".")

    visit(config, schema, "")
