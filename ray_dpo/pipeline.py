"""The align pipeline's stages, composed: shared by `pipelines/align.py` and the Tune sweep.

Checks that write nothing (`resolve_paths`, `validate`), then the stages in order: `start_ray`,
`write_synthetic`, `load_data`, `starting_weights` (SFT warm start), `precompute_reference`, training
(`ray_dpo.train.train_dpo`) and `run_evaluation`.
"""

from __future__ import annotations

import functools
import glob
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ray_dpo import tracking
from ray_dpo.config import Config, ConfigError
from ray_dpo.dpo import default_reduction
from ray_dpo.errors import UserError
from ray_dpo.tokenizer import load_tokenizer

# ------------------------------------------------------------------------------------- checks (nothing written)


def _is_uri(path: str) -> bool:
    return "://" in path


def _absolute(path: str | None) -> str | None:
    return path if path is None or _is_uri(path) else str(Path(path).expanduser().resolve())


def resolve_paths(config: Config) -> Config:
    """Absolute local paths: Ray workers chdir into their session dir and `ray job submit` runs elsewhere."""
    c = config
    c.output_dir = _absolute(c.output_dir)
    c.train.storage_path = _absolute(c.train.storage_path)
    c.data.train_path, c.data.val_path = _absolute(c.data.train_path), _absolute(c.data.val_path)
    c.sft.path, c.train.init_checkpoint = _absolute(c.sft.path), _absolute(c.train.init_checkpoint)
    if c.data.tokenizer != "byte":
        c.data.tokenizer = _absolute(c.data.tokenizer)
    return c


def _check_exists(key: str, path: str | None) -> None:
    if path is None or _is_uri(path):
        return  # remote paths are checked by the reader
    if not (os.path.exists(path) or glob.glob(path)):
        raise ConfigError(f"config: {key}: no such file or directory: {path}")


def validate(config: Config):
    """Cheap checks: data paths, checkpoint, tokenizer, vocabulary. Returns the tokenizer."""
    c = config
    if c.data.synthetic not in (None, "sort"):
        raise ConfigError(f"config: data.synthetic must be 'sort' or null, got {c.data.synthetic!r}")
    if c.data.train_path is None and c.data.synthetic is None:
        raise ConfigError("config: data.train_path is required (or data.synthetic=sort for the demo task)")
    for key, path in (("data.train_path", c.data.train_path), ("data.val_path", c.data.val_path)):
        _check_exists(key, path)
    _check_exists("sft.path", c.sft.path)
    if c.train.init_checkpoint is not None:
        _check_exists("train.init_checkpoint", str(Path(c.train.init_checkpoint) / "model.safetensors"))
    try:
        tokenizer = load_tokenizer(c.data.tokenizer)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"config: data.tokenizer: {err}") from None
    vocab = c.model.vocab_size
    if c.train.init_checkpoint is None and vocab < tokenizer.vocab_size:
        raise ConfigError(f"config: model.vocab_size={vocab} < the tokenizer's {tokenizer.vocab_size} tokens")
    if c.data.max_len > c.model.max_seq_len:
        raise ConfigError(f"config: data.max_len={c.data.max_len} exceeds model.max_seq_len={c.model.max_seq_len}")
    return tokenizer


# ------------------------------------------------------------------------------------------------- stages


def start_ray(address: str | None, tracking_uri: str) -> None:
    import ray

    env = {} if os.environ.get(tracking.TRACKING_URI_ENV) == tracking_uri else {tracking.TRACKING_URI_ENV: tracking_uri}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        address = "local"  # never attach by surprise to another `ray start` on this machine
    ray.init(address=address, runtime_env={"env_vars": env} if env else None)


def write_synthetic(config: Config) -> None:
    """`data.synthetic=sort`: write the demo task and use it wherever the config leaves a path unset."""
    from ray_dpo.demo import write_sort_task

    paths = write_sort_task(
        Path(config.output_dir) / "data" / "sort", rows=config.data.synthetic_rows, seed=config.data.seed
    )
    config.data.train_path = config.data.train_path or paths["train"]
    config.data.val_path = config.data.val_path or paths["val"]
    config.sft.path = config.sft.path or paths["sft"]


def load_data(config: Config, tokenizer, uri: str, run_id: str):
    """Tokenized train / val datasets; training order shuffled (seeded) unless length bucketing orders it."""
    from ray_dpo.data import read_preferences, split_train_val

    d = config.data
    kwargs = dict(
        tokenizer=tokenizer,
        max_len=d.max_len,
        max_prompt_len=d.max_prompt_len,
        columns=d.columns or None,
        on_bad_row=d.on_bad_row,
    )
    train_ds, stats = read_preferences(d.train_path, **kwargs)
    all_stats = {"train": stats.as_dict()}
    if d.val_path:
        val_ds, val_stats = read_preferences(d.val_path, **kwargs)
        all_stats["val"] = val_stats.as_dict()
    else:
        train_ds, val_ds = split_train_val(train_ds, d.val_fraction, d.seed)
    if d.length_bucket_window > 0:
        from ray_dpo.data import bucket_by_length

        train_ds = bucket_by_length(train_ds, d.length_bucket_window, seed=d.seed)
    else:
        train_ds = train_ds.random_shuffle(seed=d.seed).materialize()
    all_stats["train"]["rows_used"], all_stats["val_rows"] = train_ds.count(), val_ds.count()
    tracking.log_dict(uri, run_id, all_stats, "data/stats.json")
    return train_ds, val_ds


def starting_weights(config: Config, tokenizer, run_dir: Path, uri: str, run_id: str) -> str:
    """The checkpoint both the policy and the reference start from (SFT result, init checkpoint, or a seeded
    fresh init), saved once with the tokenizer under the run dir: every rank loads the same reference from it,
    and a re-run of the same run name reuses it."""
    from ray_dpo.checkpoint import load_model, save_model
    from ray_dpo.model import TransformerLM

    reference = run_dir / "reference"
    if (reference / "model.safetensors").is_file():
        return str(reference)
    if config.train.init_checkpoint is not None:
        model = load_model(config.train.init_checkpoint)
    else:
        torch.manual_seed(config.train.seed)
        model = TransformerLM(config.model)
    if config.sft.path is not None:
        from ray_dpo.sft import read_sft, train_sft

        start = save_model(run_dir / "sft-init", model, tokenizer)
        sft_ds = read_sft(
            config.sft.path,
            tokenizer=tokenizer,
            max_len=config.data.max_len,
            max_prompt_len=config.data.max_prompt_len,
            prompt_column=config.sft.prompt_column,
            response_column=config.sft.response_column,
        )
        result = train_sft(
            config, sft_ds, init_checkpoint=str(start), run_id=run_id, tracking_uri=uri, pad_id=tokenizer.pad_id
        )
        model = load_model(result.checkpoint)
    save_model(reference, model, tokenizer)
    return str(reference)


def precompute_reference(config: Config, datasets: list, reference: str) -> list:
    from ray_dpo.reference import add_reference_logps

    reduction = default_reduction(config.dpo.loss_type, config.dpo.reduction)
    return [add_reference_logps(ds, reference, reduction=reduction) for ds in datasets]


def run_evaluation(config: Config, policy: str, reference: str, val_ds, uri: str, run_id: str) -> dict[str, float]:
    import ray

    from ray_dpo.evaluate import evaluate

    prompt_column = config.data.columns.get("prompt", "prompt")
    prompts = ray.data.read_parquet(config.data.val_path or config.data.train_path).select_columns([prompt_column])
    prompts = prompts.limit(config.eval.num_prompts)
    return evaluate(
        config,
        policy_checkpoint=policy,
        reference_checkpoint=reference,
        prompts_ds=prompts,
        preference_ds=val_ds,
        tracking_uri=uri,
        run_id=run_id,
    )


def find_user_error(err: BaseException) -> UserError | None:
    """The UserError behind `err`, also when Ray wrapped it (task errors, Train worker-group errors)."""
    seen: set[int] = set()
    stack = [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserError):
            return current
        stack += [current.__cause__, current.__context__, getattr(current, "cause", None)]
        stack += list((getattr(current, "worker_failures", None) or {}).values())
    return None


EXIT_USER_ERROR = 2


def exit_on_user_error(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a pipeline's `main`: a user error (also inside a Ray error) prints `error: <one line>` and returns 2;
    anything else is a bug and keeps its traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except Exception as err:
            user_error = find_user_error(err)
            if user_error is None:
                raise
            print(f"error: {' '.join(str(user_error).split())}", file=sys.stderr)
            return EXIT_USER_ERROR

    return wrapper
