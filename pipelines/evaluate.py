"""Evaluate a policy checkpoint against a reference checkpoint on held-out prompts; log `eval/*` to MLflow.

    python pipelines/evaluate.py --checkpoint POLICY_DIR --reference REFERENCE_DIR
        [--config configs/demo.yaml] [--prompts FILE.parquet] [--pairs FILE.parquet] [--run-id ID]
        [--address ADDR] [section.key=value ...]

Prompts and pairs default to the config's validation split (`data.val_path`, or the `data.val_fraction` held out of
`data.train_path`; the demo's generated val file with `data.synthetic=sort`), encoded with the checkpoint's own
tokenizer. Logs into `--run-id` when given, else into a new run `<run name>-eval`. A user error prints
`error: <one line>` and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ray_dpo import recipe
from ray_dpo.config import load_config
from ray_dpo.errors import exit_on_error
from ray_dpo.recipe.checks import check_evaluation
from ray_dpo.recipe.console import Console
from ray_dpo.stages.evaluate import format_summary
from ray_dpo.stages.tracking import redact

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


@exit_on_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", required=True, help="policy checkpoint directory or URI (any kind align writes)"
    )
    parser.add_argument("--reference", required=True, help="reference checkpoint directory")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/demo.yaml)")
    parser.add_argument("--prompts", default=None, help="Parquet with a prompt column (default: the validation split)")
    parser.add_argument("--pairs", default=None, help="Parquet preference pairs (default: the validation split)")
    parser.add_argument("--run-id", default=None, help="log into this MLflow run instead of a new one")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a new local Ray)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.temperature=0.7")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and MLflow's own logs on the console")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    checked, checkpoint, reference = check_evaluation(config, args.checkpoint, args.reference)
    params = {"eval.policy_checkpoint": checkpoint, "eval.reference": reference}
    console = Console(verbose=args.verbose)
    with recipe.open_run(
        config, address=args.address, kind="eval", run_id=args.run_id, params=params, console=console, checked=checked
    ) as run:
        metrics = recipe.evaluate_checkpoints(
            run, checkpoint, reference, prompts_path=args.prompts, pairs_path=args.pairs
        )
    print(format_summary(metrics))
    print(f"MLflow run:       {run.run_id}")
    print(f"browse:           mlflow ui --backend-store-uri {redact(run.tracking_uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
