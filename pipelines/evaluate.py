"""Evaluate a policy checkpoint against a reference checkpoint on held-out prompts; log `eval/*` to MLflow.

    python pipelines/evaluate.py --checkpoint POLICY_DIR --reference REFERENCE_DIR
        [--config configs/demo.yaml] [--prompts FILE.parquet] [--pairs FILE.parquet] [--run-id ID]
        [--address ADDR] [section.key=value ...]

Prompts: `--prompts`, else `data.val_path`; with `data.synthetic=sort` (the demo) the same held-out file that
`pipelines/align.py` writes. Preference pairs for the implicit-reward accuracy: `--pairs`, else `data.val_path`
(skipped when neither is set). Logs into `--run-id` when given, else into a new run `<run name>-eval`.
A user error prints `error: <one line>` and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ray_dpo import tracking
from ray_dpo.config import flatten, load_config
from ray_dpo.errors import UserError
from ray_dpo.pipeline import exit_on_user_error

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="policy checkpoint directory (model.safetensors, ...)")
    parser.add_argument("--reference", required=True, help="reference checkpoint directory")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/demo.yaml)")
    parser.add_argument("--prompts", default=None, help="Parquet with a prompt column (default: data.val_path)")
    parser.add_argument("--pairs", default=None, help="Parquet preference pairs (default: data.val_path)")
    parser.add_argument("--run-id", default=None, help="log into this MLflow run instead of a new one")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a new local Ray)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.temperature=0.7")
    return parser.parse_args(argv)


def _absolute(path: str | None) -> str | None:
    return path if path is None or "://" in path else str(Path(path).expanduser().resolve())


def run(argv: list[str] | None = None) -> tuple[dict[str, float], str, str]:
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    config.output_dir = _absolute(config.output_dir)
    from ray_dpo.evaluate import check_checkpoint, evaluate, load_reward_fn

    checkpoint = check_checkpoint("--checkpoint", args.checkpoint)
    reference = check_checkpoint("--reference", args.reference)
    load_reward_fn(config.eval.reward_fn)
    if config.data.synthetic == "sort" and not (args.prompts and (args.pairs or config.data.val_path)):
        from ray_dpo.demo import write_sort_task

        # deterministic in (rows, seed): the very held-out file align.py trained around
        paths = write_sort_task(
            Path(config.output_dir) / "data" / "sort", rows=config.data.synthetic_rows, seed=config.data.seed
        )
        config.data.val_path = config.data.val_path or paths["val"]
    prompts_path = _absolute(args.prompts or config.data.val_path)
    pairs_path = _absolute(args.pairs or config.data.val_path)
    if prompts_path is None:
        raise UserError("evaluate: no prompts: pass --prompts FILE.parquet or set data.val_path")
    for key, path in (("--prompts", prompts_path), ("--pairs", pairs_path)):
        if path is not None and "://" not in path and not os.path.exists(path):
            raise UserError(f"evaluate: {key}: no such file or directory: {path}")
    uri = tracking.resolve_tracking_uri(config.tracking.uri, config.output_dir)
    tracking.check_tracking_uri(uri)
    # ---- from here on things start and are written

    import ray

    from ray_dpo.data import read_preferences
    from ray_dpo.tokenizer import TOKENIZER_FILE, load_tokenizer

    address = args.address or ("local" if not os.environ.get("RAY_ADDRESS") else None)
    if not ray.is_initialized():  # called from a notebook or a test with Ray already up: use that one
        ray.init(address=address)
    has_own = (Path(checkpoint) / TOKENIZER_FILE).is_file()
    tokenizer = load_tokenizer(checkpoint if has_own else config.data.tokenizer)
    column = config.data.columns.get("prompt", "prompt")
    prompts = ray.data.read_parquet(prompts_path).select_columns([column]).limit(config.eval.num_prompts)
    pairs = None
    if pairs_path is not None:
        pairs, _ = read_preferences(
            pairs_path,
            tokenizer=tokenizer,
            max_len=config.data.max_len,
            max_prompt_len=config.data.max_prompt_len,
            columns=config.data.columns or None,
            on_bad_row=config.data.on_bad_row,
        )
    run_id = args.run_id or tracking.start_run(
        uri,
        experiment=config.tracking.experiment,
        run_name=f"{config.tracking.run_name or config.train.run_name}-eval",
        params={**flatten(config.to_dict()), "eval.policy_checkpoint": checkpoint, "eval.reference": reference},
    )
    try:
        metrics = evaluate(
            config,
            policy_checkpoint=checkpoint,
            reference_checkpoint=reference,
            prompts_ds=prompts,
            preference_ds=pairs,
            tracking_uri=uri,
            run_id=run_id,
        )
    except BaseException:
        if args.run_id is None:
            tracking.end_run(uri, run_id, "FAILED")
        raise
    if args.run_id is None:
        tracking.end_run(uri, run_id)
    return metrics, run_id, uri


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    from ray_dpo.evaluate import format_summary

    metrics, run_id, uri = run(argv)
    print(format_summary(metrics))
    print(f"MLflow run:       {run_id}")
    print(f"browse:           mlflow ui --backend-store-uri {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
