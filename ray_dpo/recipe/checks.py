"""Every check that needs no Ray, run once before Ray starts and before anything is written.

    checked = check(config, "align")      # ConfigError naming the key, or the config (absolute paths) + encoding

A pipeline prints a failed check as `error: <one line naming the key>` and exits 2 (`ray_dpo.errors`). What a
check derives (the encoding, the model's kind) is returned, never written back into the config: configs are frozen.
The combinations a model kind cannot support are refused here (`refused_combination`), listed in the README.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from ray_dpo.config import Config, ConfigError, override
from ray_dpo.core.encoding import Encoding

RunKind = Literal["align", "sweep", "eval"]
ModelKind = Literal["ours", "hf", "hf_lora"]
SEARCH_KINDS = ("grid", "choice", "loguniform", "uniform")
FILTERS = ("top_k", "top_p", "min_p", "top_a")
PREFIX_SHARING_HF = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")  # 4-D masks + position ids


@dataclass(frozen=True)
class Checked:
    config: Config  # local paths absolute
    encoding: Encoding  # the run's one encoding spec
    model_kind: ModelKind


def check(config: Config, kind: RunKind = "align") -> Checked:
    """All cheap checks, in the order a user would fix them: paths, model and tokenizer, training arithmetic,
    combinations, evaluation, the sweep."""
    config = absolute_paths(config)
    _check_data(config)
    refused = refused_combination(config, model_kind(config)) if kind != "eval" else None
    if refused:
        raise ConfigError(f"config: {refused}")
    encoding, kind_found = _check_model(config)
    if kind != "eval":
        _check_training(config)
    _check_eval(config)
    if kind == "sweep":
        check_sweep(config)
    return Checked(config, encoding, kind_found)


# ------------------------------------------------------------------------------------------------ paths


def is_uri(path: str) -> bool:
    return "://" in path


def absolute(path: str | None) -> str | None:
    """Local paths made absolute (Ray workers chdir into their session dir; `ray job submit` runs elsewhere); URIs
    and hub ids kept as written."""
    if path is None or is_uri(path):
        return path
    return str(Path(path).expanduser().resolve())


def absolute_paths(config: Config) -> Config:
    c = config
    tokenizer = c.data.tokenizer if c.data.tokenizer == "byte" else absolute(c.data.tokenizer)
    hf_path = c.model.hf_path
    if hf_path is not None and os.path.exists(os.path.expanduser(hf_path)):  # a directory; else a hub id
        hf_path = absolute(hf_path)
    return replace(
        c,
        output_dir=absolute(c.output_dir),
        model=replace(c.model, hf_path=hf_path),
        data=replace(
            c.data, train_path=absolute(c.data.train_path), val_path=absolute(c.data.val_path), tokenizer=tokenizer
        ),
        sft=replace(c.sft, path=absolute(c.sft.path)),
        train=replace(
            c.train, storage_path=absolute(c.train.storage_path), init_checkpoint=absolute(c.train.init_checkpoint)
        ),
    )


def _check_exists(key: str, path: str | None) -> None:
    if path is None or is_uri(path):
        return  # remote paths are checked by their reader
    if not (os.path.exists(path) or glob.glob(path)):
        raise ConfigError(f"config: {key}: no such file or directory: {path}")


def _check_data(c: Config) -> None:
    if c.data.synthetic not in (None, "sort"):
        raise ConfigError(f"config: data.synthetic must be 'sort' or null, got {c.data.synthetic!r}")
    if c.data.train_path is None and c.data.synthetic is None:
        raise ConfigError("config: data.train_path is required (or data.synthetic=sort for the demo task)")
    for key, path in (("data.train_path", c.data.train_path), ("data.val_path", c.data.val_path)):
        _check_exists(key, path)
    _check_exists("sft.path", c.sft.path)
    if not 0.0 < c.data.val_fraction < 1.0:
        raise ConfigError(f"config: data.val_fraction must be in (0, 1), got {c.data.val_fraction}")
    if c.data.length_bucket_window < 0:
        raise ConfigError(f"config: data.length_bucket_window must be >= 0, got {c.data.length_bucket_window}")


# ------------------------------------------------------------------------------------------------ model, tokenizer


def _init_kind(c: Config) -> str | None:
    """The kind of `train.init_checkpoint` (local or in storage), or None when unset."""
    if c.train.init_checkpoint is None:
        return None
    from ray_dpo.stages import models

    _check_exists("train.init_checkpoint", c.train.init_checkpoint)
    try:
        return models.kind(c.train.init_checkpoint)
    except (ValueError, OSError) as err:
        raise ConfigError(
            f"config: train.init_checkpoint={c.train.init_checkpoint}: {str(err).splitlines()[0]}"
        ) from None


def model_kind(c: Config) -> ModelKind:
    """Which kind of model the run trains: ours, or a Hugging Face model (all weights, or LoRA adapters)."""
    init = _init_kind(c)
    hf = c.model.hf_path is not None or init in ("hf", "adapter") or _sharded_hf(c, init)
    return ("hf_lora" if c.model.lora_r else "hf") if hf else "ours"


def _check_model(c: Config) -> tuple[Encoding, ModelKind]:
    """The model's kind, its tokenizer and the encoding; a Hugging Face model is checked from its config only."""
    kind = model_kind(c)
    hf, init = kind != "ours", _init_kind(c)
    if hf:
        tokenizer, positions = _check_hf_model(c)
    else:
        tokenizer, positions = _load_tokenizer(c, c.data.tokenizer), c.model.max_seq_len
        if init is None and c.model.vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"config: model.vocab_size={c.model.vocab_size} < the tokenizer's {tokenizer.vocab_size} tokens"
            )
    if positions is not None and c.data.max_len > positions:
        raise ConfigError(f"config: data.max_len={c.data.max_len} exceeds the model's {positions} positions")
    if c.data.chat_template and not getattr(tokenizer, "has_chat_template", False):
        raise ConfigError("config: data.chat_template=true but the tokenizer has no chat template (set data.tokenizer)")
    try:
        encoding = Encoding(
            tokenizer, max_len=c.data.max_len, max_prompt_len=c.data.max_prompt_len, chat_template=c.data.chat_template
        )
    except ValueError as err:
        raise ConfigError(f"config: data.max_prompt_len / data.max_len: {err}") from None
    return encoding, kind


def _sharded_hf(c: Config, init: str | None) -> bool:
    if init != "sharded":
        return False
    with config_files(c.train.init_checkpoint) as directory:
        return not (Path(directory) / "model_config.json").is_file()


SMALL_FILES = ("config.json", "model_config.json", "base.json", "encoding.json", "adapter_config.json")


@contextlib.contextmanager
def config_files(path: str) -> Iterator[str]:
    """A local directory with a checkpoint's configs and tokenizer files (never its weights: the checks stay cheap
    at any model size); a hub id as it is."""
    if not is_uri(path):
        yield path
        return
    from ray_dpo.core.checkpoint import TOKENIZER_FILES
    from ray_dpo.stages import storage

    with storage.small_files(path, (*SMALL_FILES, *TOKENIZER_FILES)) as directory:
        yield directory


def _load_tokenizer(c: Config, where: str):
    from ray_dpo.core.tokenizer import PretrainedTokenizer, load_tokenizer

    try:
        if where != "byte" and not os.path.exists(where):  # a hub id (where the machine has network)
            return PretrainedTokenizer(where)
        return load_tokenizer(where)
    except (OSError, ValueError) as err:
        raise ConfigError(f"config: data.tokenizer: {where}: {str(err).splitlines()[0]}") from None


def _check_hf_model(c: Config):
    """A causal LM `AutoModelForCausalLM` loads; its (or data.tokenizer's) tokenizer; LoRA targets that exist.
    Reads configs only: no weights are loaded. Returns (tokenizer, the model's positions)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        raise ConfigError("config: a Hugging Face model needs transformers and peft: pip install -e '.[hf]'") from None
    key, path = (
        ("model.hf_path", c.model.hf_path) if c.model.hf_path else ("train.init_checkpoint", c.train.init_checkpoint)
    )
    base = None
    with config_files(path) as where:
        base = _adapter_base(where)
    with config_files(base or path) as where:  # LoRA adapters: their base's architecture
        try:
            hf_config = AutoConfig.from_pretrained(where)
        except (OSError, ValueError) as err:
            raise ConfigError(f"config: {key}={path}: not a Hugging Face model ({str(err).splitlines()[0]})") from None
        if hf_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ConfigError(f"config: {key}={path} is a {hf_config.model_type} model, not a causal LM")
    with config_files(path) as own:  # the tokenizer saved beside the weights (an adapter's too)
        tokenizer = _load_tokenizer(c, c.data.tokenizer if c.data.tokenizer != "byte" else own)
    if c.model.lora_r:
        from ray_dpo.stages.models import lora_targets_match

        with torch.device("meta"):  # the module tree, no memory
            skeleton = AutoModelForCausalLM.from_config(hf_config)
        if not lora_targets_match(skeleton, c.model.lora_target_modules):
            raise ConfigError(
                f"config: model.lora_target_modules={c.model.lora_target_modules} match no module of "
                f"{type(skeleton).__name__}"
            )
    architectures = getattr(hf_config, "architectures", None) or []
    if c.dpo.prefix_sharing and not set(architectures) & set(PREFIX_SHARING_HF):
        raise ConfigError(
            f"config: dpo.prefix_sharing=true needs a {' / '.join(PREFIX_SHARING_HF)} (a 4-D attention mask and "
            f"position ids); {key} is a {architectures or hf_config.model_type}"
        )
    return tokenizer, getattr(hf_config, "max_position_embeddings", None)


# ------------------------------------------------------------------------------------------------ training


def _adapter_base(directory: str) -> str | None:
    """The base model an adapter directory names (`base.json`), or None for any other directory."""
    import json

    base = Path(directory) / "base.json"
    return json.loads(base.read_text())["base"] if base.is_file() else None


def _check_training(c: Config) -> None:
    t = c.train
    if t.num_workers < 1 or t.grad_accum < 1:
        raise ConfigError("config: train.num_workers and train.grad_accum must be >= 1")
    for key, size in (("train.batch_size", t.batch_size), ("sft.batch_size", c.sft.batch_size)):
        if key == "sft.batch_size" and c.sft.path is None and c.data.synthetic is None:
            continue
        if size < 1 or size % (t.num_workers * t.grad_accum):
            raise ConfigError(
                f"config: {key}={size} must be a multiple of train.num_workers * train.grad_accum = "
                f"{t.num_workers * t.grad_accum} (equal micro-batches on every worker)"
            )
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"config: train.max_steps must be >= 1 or null, got {t.max_steps}")
    for key in ("log_every", "eval_every", "checkpoint_every", "num_to_keep", "epochs"):
        if getattr(t, key) < 1:
            raise ConfigError(f"config: train.{key} must be >= 1, got {getattr(t, key)}")
    if t.accelerator_type is not None and not t.use_gpu:
        raise ConfigError(f"config: train.accelerator_type={t.accelerator_type} needs train.use_gpu=true")
    if t.cpus_per_worker <= 0:
        raise ConfigError(f"config: train.cpus_per_worker must be > 0, got {t.cpus_per_worker}")
    if t.val_max_pairs is not None and t.val_max_pairs < 1:
        raise ConfigError(f"config: train.val_max_pairs must be >= 1 or null, got {t.val_max_pairs}")
    d = c.dpo
    if d.reference_concurrency < 1 or d.reference_batch_size < 1:
        raise ConfigError("config: dpo.reference_concurrency and dpo.reference_batch_size must be >= 1")
    if c.dpo.label_smoothing and c.dpo.loss_type not in ("sigmoid", "robust"):
        raise ConfigError(f"config: dpo.label_smoothing applies to sigmoid and robust only, not {c.dpo.loss_type}")
    if not 0.0 <= c.dpo.label_smoothing < 0.5:
        raise ConfigError(f"config: dpo.label_smoothing must be in [0, 0.5), got {c.dpo.label_smoothing}")


def refused_combination(c: Config, model_kind: ModelKind) -> str | None:
    """Why this combination of switches cannot run, naming the keys; None when it can. The README lists these."""
    if c.data.chat_template and model_kind == "ours" and c.data.tokenizer == "byte":
        return "data.chat_template=true needs a tokenizer with a chat template; the byte tokenizer has none"
    return None


# ------------------------------------------------------------------------------------------------ evaluation


def _check_eval(c: Config) -> None:
    e = c.eval
    if e.max_new_tokens < 1 or e.batch_size < 1 or e.concurrency < 1 or e.beams < 1 or e.num_prompts < 1:
        raise ConfigError(
            "config: eval.num_prompts, eval.max_new_tokens, eval.batch_size, eval.concurrency and eval.beams must "
            "be >= 1"
        )
    if e.temperature < 0:
        raise ConfigError(f"config: eval.temperature must be >= 0, got {e.temperature}")
    if e.kl_samples < 0 or e.max_pairs < 0:
        raise ConfigError(f"config: eval.kl_samples and eval.max_pairs must be >= 0, got {e.kl_samples}, {e.max_pairs}")
    if e.filter_logits_fn not in (None, *FILTERS):
        raise ConfigError(f"config: eval.filter_logits_fn must be one of {', '.join(FILTERS)} or null")
    from ray_dpo.stages.evaluate import load_reward_fn

    load_reward_fn(e.reward_fn)  # also with evaluation off: a reward function that cannot load is a config error


def check_evaluation(config: Config, policy: str, reference: str) -> tuple[Checked, str, str]:
    """`pipelines/evaluate.py`: the config's checks, both checkpoints of a kind the trainer writes, and the
    encoding the policy was trained with (its own `encoding.json`; the config's for a checkpoint without one)."""
    from ray_dpo.stages.evaluate import check_checkpoint
    from ray_dpo.stages.models import load_encoding

    checked = check(config, "eval")
    policy, reference = check_checkpoint("--checkpoint", policy), check_checkpoint("--reference", reference)
    return replace(checked, encoding=load_encoding(policy, fallback=checked.encoding)), policy, reference


# ------------------------------------------------------------------------------------------------ sweeps


def search_values(config: Config) -> dict[str, tuple[str, list[Any]]]:
    """`tune.search_space` checked: dotted key -> (kind, values); each key a real config key and every value (or
    bound) one it accepts."""
    space = config.tune.search_space
    if not space:
        raise ConfigError("config: tune.search_space is empty (e.g. {dpo.beta: {grid: [0.1, 0.5]}})")
    out = {}
    for key, spec in space.items():
        where = f"tune.search_space.{key}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
            raise ConfigError(f"config: {where} must be one of {{{'|'.join(SEARCH_KINDS)}: [...]}}, got {spec!r}")
        ((kind, values),) = spec.items()
        if not isinstance(values, list) or not values:
            raise ConfigError(f"config: {where}.{kind} must be a non-empty list, got {values!r}")
        if key.startswith("tune.") or key in ("train.run_name", "train.storage_path", "output_dir"):
            raise ConfigError(f"config: {where}: the sweep sets this key itself")
        if kind in ("loguniform", "uniform"):
            try:
                values = [float(v) for v in values]  # PyYAML reads 3e-4 as a string
                low, high = values
            except (TypeError, ValueError):
                raise ConfigError(f"config: {where}.{kind} must be [low, high] numbers, got {values!r}") from None
            if not low < high or (kind == "loguniform" and low <= 0):
                raise ConfigError(f"config: {where}.{kind} needs 0 < low < high (low > 0 for loguniform): {values}")
        for value in values:  # unknown keys and bad values fail here, naming the key
            override(config, {key: value}, where="tune.search_space")
        out[key] = (kind, values)
    return out


def check_sweep(c: Config) -> None:
    t = c.tune
    search_values(c)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", t.name):
        raise ConfigError(f"config: tune.name must be a plain directory name (letters, digits, . _ -), got {t.name!r}")
    if t.num_samples < 1 or t.max_concurrent_trials < 1:
        raise ConfigError("config: tune.num_samples and tune.max_concurrent_trials must be >= 1")
    if t.search_alg == "optuna":
        grids = [k for k, spec in t.search_space.items() if "grid" in spec]
        if grids:
            raise ConfigError(
                f"config: tune.search_alg=optuna samples: tune.search_space.{grids[0]} is a grid, use choice"
            )
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("config: tune.search_alg=optuna needs optuna: pip install -e '.[tune]'") from None
    if t.cpus_per_trial <= 0:
        raise ConfigError(f"config: tune.cpus_per_trial must be > 0 (Tune rejects 0), got {t.cpus_per_trial}")
    prefix = t.metric.split("/", 1)[0]
    if prefix not in ("train", "val", "eval"):
        raise ConfigError(f"config: tune.metric must be a train/*, val/* or eval/* metric, got {t.metric!r}")
    if prefix == "eval" and not c.eval.enabled:
        raise ConfigError(f"config: tune.metric={t.metric} needs eval.enabled=true")
    if t.scheduler == "asha":
        if prefix == "eval":  # eval/* exists only after training: nothing for ASHA to compare on the way
            raise ConfigError(f"config: tune.scheduler=asha needs a metric reported during training, got {t.metric}")
        if t.grace_period < 1 or t.reduction_factor <= 1:
            raise ConfigError("config: tune.grace_period must be >= 1 and tune.reduction_factor > 1")
