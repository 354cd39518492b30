"""Align a policy with DPO on Ray: config -> Ray -> data -> (SFT) -> (reference pass) -> train -> eval -> MLflow.

    python pipelines/align.py [--config configs/demo.yaml] [--address ADDR] [section.key=value ...]
    ray job submit --working-dir . -- python pipelines/align.py --config configs/tiny.yaml

Every check that needs no Ray runs BEFORE anything is written or Ray starts; a user error prints
`error: <one line naming the key>` and exits 2; any other failure prints one line naming the stage and the log file
that holds the traceback, and exits 1. Re-running with the same `train.run_name` resumes training and its MLflow run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ray_dpo import recipe
from ray_dpo.config import load_config
from ray_dpo.errors import exit_on_error
from ray_dpo.recipe.console import Console
from ray_dpo.stages.evaluate import format_summary
from ray_dpo.stages.tracking import redact

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


@exit_on_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/demo.yaml)")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a new local Ray)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and MLflow's own logs on the console")
    args = parser.parse_args(argv)
    console = Console(verbose=args.verbose)
    with recipe.open_run(load_config(args.config, args.overrides), address=args.address, console=console) as run:
        result = recipe.align(run)
    print(f"MLflow run:       {result.run_id}")
    print(f"tracking URI:     {redact(result.tracking_uri)}")
    print(f"browse:           mlflow ui --backend-store-uri {redact(result.tracking_uri)}")
    print(f"final checkpoint: {result.checkpoint} ({result.steps} steps)")
    if result.export:
        print(f"exported model:   {result.export}")
    if result.model_uri:
        print(f"registered model: {result.model_uri}")
    if result.eval_metrics:
        print(format_summary(result.eval_metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
