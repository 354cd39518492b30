"""Ray Tune sweep over config keys (beta x lr, loss types, ...): data + reference once, each trial = train + eval.

    python pipelines/sweep.py [--config configs/sweep.yaml] [--address ADDR] [section.key=value ...]

Prints the best trial, the path of its config as YAML (ready for `pipelines/align.py --config`) and the MLflow
parent run. Re-running the same `tune.name` resumes the sweep: finished trials are kept, errored or interrupted ones
run again. A user error prints `error: <one line>` and exits 2; a sweep with trials left to retry exits 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ray_dpo.config import load_config
from ray_dpo.errors import exit_on_error
from ray_dpo.recipe.console import Console
from ray_dpo.recipe.sweep import best_values, run_sweep
from ray_dpo.stages.tracking import redact

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sweep.yaml"
EXIT_INCOMPLETE = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/sweep.yaml)")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a new local Ray)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tune.num_samples=4")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and MLflow's own logs on the console")
    return parser.parse_args(argv)


@exit_on_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(verbose=args.verbose)
    result = run_sweep(load_config(args.config, args.overrides), address=args.address, console=console)
    with_columns = [c for c in result.table.columns if c not in ("mlflow_run_id", "error")]  # errors: on stderr
    print(result.table[with_columns].to_string(index=False))
    counts = ", ".join(f"{n} {status}" for status, n in result.status_counts.items() if n)
    print(f"trials:           {counts}")
    print(f"results table:    {result.table_path}")
    if result.best_config is not None:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in result.best_metrics.items())
        print(f"best trial:       {result.best_trial_id} ({metrics})")
        for key, value in best_values(result).items():
            print(f"  {key} = {value}")
        print(f"best config:      {result.best_config_path}")
        print(f"  align it:       python pipelines/align.py --config {result.best_config_path}")
    print(f"MLflow parent run: {result.parent_run_id}")
    print(f"browse:           mlflow ui --backend-store-uri {redact(result.tracking_uri)}")
    incomplete = result.status_counts.get("errored", 0) + result.status_counts.get("unfinished", 0)
    if incomplete:
        print(f"{incomplete} trial(s) did not finish: re-run the same command to resume them", file=sys.stderr)
        return EXIT_INCOMPLETE
    return 0


if __name__ == "__main__":
    sys.exit(main())
