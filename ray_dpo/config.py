"""Typed config: nested frozen dataclasses, loaded from YAML with dotted command-line overrides (litgpt style).

    cfg = load_config("configs/demo.yaml", ["train.lr=3e-4", "dpo.beta=0.2"])
    trial = override(cfg, {"dpo.beta": 0.5})          # a new, checked config; configs are never mutated

Unknown keys and values of the wrong type raise `ConfigError` naming the key. No torch import here: a config is
read and checked before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ray_dpo.core.names import FDivergenceType, LossType, Reduction, ReferenceMode
from ray_dpo.errors import UserError


class ConfigError(UserError):
    pass


@dataclass(frozen=True)
class ModelSettings:
    """`model.*`: our TransformerLM's shape (`ray_dpo.core.model.ModelConfig`'s keys), or a Hugging Face causal LM."""

    vocab_size: int = 259  # ByteTokenizer: 256 bytes + pad, bos, eos
    max_seq_len: int = 512  # longest sequence RoPE tables and the KV cache are sized for
    dim: int = 256  # residual stream width
    depth: int = 4  # number of transformer blocks
    heads: int = 4  # attention heads; dim must divide evenly into heads of even size
    ff_mult: float = 4.0  # SwiGLU hidden width = 2/3 * ff_mult * dim, rounded up to a multiple of 32
    dropout: float = 0.0  # residual and attention dropout (training only)
    tie_embeddings: bool = True  # share the token embedding with the output projection
    rope_base: float = 10_000.0  # RoPE frequency base
    # a directory (or hub id) `transformers.AutoModelForCausalLM.from_pretrained` reads; its tokenizer comes along
    # unless data.tokenizer names another. When set, the TransformerLM keys above are ignored.
    hf_path: str | None = None
    lora_r: int = 0  # PEFT LoRA rank; 0 = train all weights. With LoRA the reference is the base, adapters off
    lora_alpha: float = 16.0  # LoRA scaling numerator (scale = lora_alpha / lora_r)
    lora_dropout: float = 0.05  # dropout on the LoRA branch
    lora_target_modules: list[str] | str = "all-linear"  # module names (or PEFT's "all-linear") that get adapters
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute

    def __post_init__(self) -> None:
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"model.dim={self.dim} must split into {self.heads} heads of even size")

    def transformer_config(self):
        """Our TransformerLM's own `ModelConfig` (what its checkpoints store)."""
        from ray_dpo.core.model import ModelConfig

        return ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})


@dataclass(frozen=True)
class DataConfig:
    train_path: str | None = None  # Parquet file, directory, glob or URI with preference pairs
    val_path: str | None = None  # separate validation Parquet; if unset, `val_fraction` of train is held out
    val_fraction: float = 0.05  # share of train rows held out for validation when val_path is unset
    synthetic: str | None = None  # built-in task to generate instead of reading files ("sort": the demo)
    synthetic_rows: int = 2000  # preference pairs the synthetic task writes
    tokenizer: str = "byte"  # "byte", a tokenizer.json, or a Hugging Face tokenizer directory (default with hf_path)
    # render string prompts / responses with the tokenizer's chat template (user turn, assistant turn); columns of
    # messages (list<struct<role, content>>, TRL's conversational format) always are
    chat_template: bool = False
    max_len: int = 512  # longest prompt + response in tokens; longer rows are truncated
    max_prompt_len: int = 256  # prompt tokens kept (its end) when a row must be truncated
    columns: dict[str, str] = field(default_factory=dict)  # our name -> file column, e.g. {prompt: question}
    on_bad_row: Literal["error", "skip"] = "error"  # stop on the first bad row, or drop and count bad rows
    length_bucket_window: int = 0  # sort pairs by length within windows of this many rows (0 = off)
    # pack whole pairs side by side into rows of up to pack_len tokens, padding only after a row's last pair; each
    # pair keeps its own positions and attention (the loss and gradients of the unpacked pairs). Our model, and
    # Hugging Face Llama / Qwen2 / Mistral (a 4-D mask and position ids)
    packing: bool = False
    pack_len: int = 4096  # tokens per packed row: at least 2 * max_len (prompt + both responses of the longest pair)
    seed: int = 0  # split and shuffle seed


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1  # KL penalty strength: higher keeps the policy closer to the reference
    # the loss (README: Losses): one name, or a list of them added up, each weighed by dpo.loss_weights
    loss_type: LossType | list[LossType] = "sigmoid"
    loss_weights: list[float] | None = None  # one weight per dpo.loss_type entry; null: 1 each
    # label-flip rate of robust, exo_pair (its epsilon), aot and aot_unpaired; of sigmoid with sigmoid_label_smoothing
    label_smoothing: float = 0.0
    # sigmoid applies label_smoothing as cDPO (ray_dpo's former sigmoid; TRL's ignores it)
    sigmoid_label_smoothing: bool = False
    f_divergence_type: FDivergenceType = "reverse_kl"  # f-DPO: the divergence the loss regularises by (reverse_kl: DPO)
    f_alpha_divergence_coef: float = 0.5  # alpha_divergence's alpha, TRL's parameterisation (1: reverse KL, 0: forward)
    discopop_tau: float = 0.05  # discopop: temperature of its logistic / exponential mix
    simpo_gamma: float = 0.5  # simpo: target reward margin
    orpo_lambda: float = 0.1  # orpo: weight of the odds-ratio term next to the NLL
    bco_reward_shift: bool = False  # bco_pair: subtract the running mean reward (the BCO paper; TRL 1.x does not)
    # null: each loss normalises as TRL (most sum token log-probs; ipo, sigmoid_norm, simpo, orpo divide by length);
    # sum / mean: every loss sees summed / per-token log-probs (ray_dpo's former option)
    reduction: Reduction | None = None
    # live: a frozen reference model on each worker; precomputed: a log-prob pass first, trainers hold only the
    # policy; none: reference-free DPO (an implicit uniform reference). Losses that use no reference (sft, simpo,
    # orpo) load and score none, whatever this says
    reference: ReferenceMode = "live"
    prefix_sharing: bool = False  # run the shared prompt once per pair (packed [prompt, chosen, rejected])
    # TR-DPO (TRL's names): every ref_model_sync_steps optimizer steps the live reference becomes
    # ref_model_mixup_alpha * policy + (1 - alpha) * reference (alpha 1: a copy); with LoRA, a second adapter set
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6  # TR-DPO's alpha, in (0, 1]
    ref_model_sync_steps: int = 512  # TR-DPO's tau: optimizer steps between reference updates
    reference_concurrency: int = 1  # actors of the precomputed reference pass (each loads the reference once)
    reference_num_gpus: float | None = None  # GPUs per reference-pass actor; null: one when train.use_gpu
    reference_batch_size: int = 32  # pairs per batch of the reference pass
    # keep the reference pass's log-probs in <train.storage_path>/reference_logps/<key>/ (key: the reference's
    # weights, the encoding and the scoring settings; rows found by their tokens) and reuse them in any later run or
    # sweep with the same key; a sweep then runs the pass once for all its trials (README: Tune sweeps)
    reference_cache: bool = True

    def loss_spec(self):
        """The loss these keys describe (`ray_dpo.core.losses.LossSpec`); ValueError naming the key if invalid."""
        from ray_dpo.core.losses import LossSpec

        return LossSpec(reference_free=self.reference == "none", **self.loss_options())

    def loss_options(self) -> dict[str, Any]:
        """`LossSpec`'s fields (and `DPO`'s loss keywords) from this section, `dpo.reference` aside."""
        from ray_dpo.core.losses import LossSpec

        return {f.name: getattr(self, f.name) for f in dataclasses.fields(LossSpec) if hasattr(self, f.name)}

    @property
    def uses_reference(self) -> bool:
        """Whether a reference model or its log-probs are needed at all (no reference pass, no model otherwise)."""
        return self.loss_spec().needs_reference


@dataclass(frozen=True)
class SFTConfig:
    path: str | None = None  # Parquet of (prompt, response) for a supervised warm start; None = skip SFT
    prompt_column: str = "prompt"  # column holding the prompt
    response_column: str = "response"  # column holding the target response
    epochs: int = 1  # passes over the SFT data
    lr: float = 1e-3  # SFT peak learning rate
    batch_size: int = 32  # global SFT batch size


@dataclass(frozen=True)
class TrainConfig:
    num_workers: int = 2  # Ray Train workers (DDP ranks)
    use_gpu: bool = False  # one GPU per worker (NCCL) instead of CPU (gloo)
    # ddp: every worker holds the whole model; fsdp: FSDP2, parameters, gradients and optimizer state sharded over
    # the workers (for models that do not fit one GPU), sharded checkpoints
    strategy: Literal["ddp", "fsdp"] = "ddp"
    cpus_per_worker: float = 0.5  # logical CPUs reserved per worker (fractional leaves room for Ray Data)
    accelerator_type: str | None = None  # pin the workers' GPU type (e.g. H100: Ray's accelerator_type resource)
    # how Ray places the workers: PACK (as few nodes as possible), STRICT_PACK (one node), SPREAD, STRICT_SPREAD
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    init_checkpoint: str | None = None  # checkpoint dir to start from (its model config wins over `model`)
    batch_size: int = 8  # GLOBAL pairs per optimizer step (split across workers and accumulation)
    grad_accum: int = 1  # micro-batches per optimizer step on each worker
    epochs: int = 1  # passes over the training data
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs when set)
    lr: float = 1e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 10  # linear warmup steps before cosine decay
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    # bf16: fp32 master weights, bf16 compute (autocast), a frozen reference held in bf16; fp32: everything fp32
    precision: Literal["fp32", "bf16"] = "bf16"
    compile: bool = False  # torch.compile the policy and a live reference (pays off only on long runs)
    seed: int = 0  # seeds model init, data order and dropout
    log_every: int = 10  # log train/* metrics to MLflow every this many steps (and at the end)
    eval_every: int = 50  # validation every this many steps (and at the end)
    val_max_pairs: int | None = 2000  # validation pairs scored each time (the first of the split); null = all
    checkpoint_every: int = 100  # checkpoint every this many steps (and at the end)
    num_to_keep: int = 2  # checkpoints kept on storage (plus, briefly, the one being uploaded)
    max_failures: int = 1  # worker-group restarts from the latest checkpoint before giving up
    run_name: str = "ray-dpo"  # Ray Train run name: re-running with the same name resumes
    storage_path: str = "outputs/ray"  # checkpoints and run state (local dir, NFS or s3://)


@dataclass(frozen=True)
class EvalConfig:
    enabled: bool = True  # generate from policy and reference after training
    num_prompts: int = 64  # held-out prompts to sample
    max_new_tokens: int = 64  # tokens generated per response
    temperature: float = 0.0  # 0 = greedy
    filter_logits_fn: str | None = None  # top_k, top_p, min_p, top_a, or None
    filter_kwargs: dict[str, float] = field(default_factory=dict)  # e.g. {thres: 0.9} for top_p
    beams: int = 1  # beam search when > 1
    # responses SAMPLED from each model per prompt (temperature 1, no filter) for the KL(policy||reference) and
    # reward estimates with standard errors (decoding above is for the samples table); 0 = no KL estimate
    kl_samples: int = 4
    batch_size: int = 16  # rows (prompts or pairs) per batch in each actor
    concurrency: int = 1  # evaluation actors (each loads the policy and the reference once)
    num_gpus: float | None = None  # GPUs per evaluation actor; null: one when train.use_gpu
    max_pairs: int = 2000  # held-out pairs scored for the implicit-reward accuracy (the first ones); 0 = none
    reward_fn: str | None = None  # "module:function"(prompts, responses) -> list[float]; None = no rewards


@dataclass(frozen=True)
class TuneConfig:
    name: str = "ray-dpo-sweep"  # sweep name: re-running with the same name resumes it
    metric: str = "val/rewards/accuracies"  # metric to rank trials (and for ASHA)
    mode: Literal["min", "max"] = "max"  # whether `metric` is better high or low
    num_samples: int = 1  # samples of the search space (grids multiply)
    search_space: dict[str, Any] = field(
        default_factory=dict
    )  # dotted key -> {grid|choice: [..]} / {loguniform: [lo, hi]}
    max_concurrent_trials: int = 1  # trials at once
    cpus_per_trial: float = 0.25  # CPUs held by each trial's driver + tasks (Train workers add train.cpus_per_worker)
    # how trials are proposed: random/grid sampling of search_space, or Optuna's TPE (pip install -e ".[tune]";
    # grids are not for Optuna: use {choice: [...]})
    search_alg: Literal["random", "optuna"] = "random"
    scheduler: Literal["asha", "fifo"] = "asha"  # early stopping
    grace_period: int = 1  # ASHA: optimizer steps before a trial can be stopped (rungs at grace * factor^k steps)
    reduction_factor: float = 2.0  # ASHA: keep 1/reduction_factor per rung
    max_failures: int = 1  # retries of a failed trial within the sweep (resumes its Train checkpoint); then re-run


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None  # MLflow tracking URI; MLFLOW_TRACKING_URI wins; default sqlite:///<output_dir>/mlflow.db
    experiment: str = "ray-dpo"  # MLflow experiment name
    run_name: str | None = None  # MLflow run name (default: train.run_name)
    registered_model: str | None = "ray-dpo-policy"  # register the final policy under this name; None = skip


@dataclass(frozen=True)
class Config:
    output_dir: str = "outputs"  # local outputs (MLflow SQLite store, generated data); made absolute
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataConfig = field(default_factory=DataConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_value(key: str, value: Any, hint: Any) -> Any:
    """Return `value` converted to `hint` (int -> float allowed), or raise ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        errors = []
        for arm in (a for a in typing.get_args(hint) if a is not type(None)):
            try:
                return _check_value(key, value, arm)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"config: {key} must be one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config: {key} must be a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config: {key} must be a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # PyYAML (YAML 1.1) reads `3e-4` as a string
            return float(value)
        except ValueError:
            pass
    # bool is an int subclass: `true` is not a valid int and 1 is not a valid bool
    if not isinstance(value, hint) or (isinstance(value, bool) and hint is not bool):
        raise ConfigError(f"config: {key} must be {hint.__name__}, got {value!r}")
    return value


# Keys that existed once: a config that still uses one gets told what replaced it.
REPLACED_KEYS = {
    "dpo.reference_free": "dpo.reference (live | precomputed | none): dpo.reference_free=true is dpo.reference=none",
    "dpo.rpo_alpha": "dpo.loss_type and dpo.loss_weights (as TRL 1.x): dpo.rpo_alpha=a is dpo.loss_type=[sigmoid, sft] "
    "dpo.loss_weights=[1, a]",
}


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if key in REPLACED_KEYS:
            raise ConfigError(f"config: {key} was replaced by {REPLACED_KEYS[key]}")
        if name not in known:
            raise ConfigError(f"config: unknown key '{key}' (known: {', '.join(sorted(known))})")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config: {key} must be a mapping of keys, got {value!r}")
            kwargs[name] = _build(hint, value, f"{key}.")
        else:
            kwargs[name] = _check_value(key, value, hint)
    try:
        return cls(**kwargs)
    except ValueError as err:  # a section's own cross-field check (e.g. ModelConfig heads)
        raise ConfigError(f"config: {err}") from None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.lr=3e-4", "eval.enabled=false"]` -> nested dict; values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"config: override {item!r} is not of the form section.key=value")
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return nested


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config: file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config: {path} is not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config: {path} must hold a mapping of sections")
    values = _merge(values, parse_overrides(overrides or []))
    return _build(Config, values, "")


def config_from_dict(values: dict[str, Any]) -> Config:
    return _build(Config, values, "")


def override(config: Config, values: dict[str, Any], *, where: str = "config") -> Config:
    """A new config: `config` with dotted keys set (`{"train.lr": 1e-4}`), checked like a loaded one. `where` names
    the setting in errors (e.g. `tune.search_space`)."""
    nested = config.to_dict()
    for key, value in values.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"config: {where}: unknown key '{key}'")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"config: {where}: unknown key '{key}'")
        node[leaf] = value.item() if hasattr(value, "item") else value  # numpy scalars (Tune samplers)
    return config_from_dict(nested)


def save_config(config: Config, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"train.lr": 1e-4, ...} (MLflow params, Tune search keys)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
