"""Align a policy with DPO on Ray: config -> Ray -> data -> (SFT) -> (reference pass) -> train -> eval -> MLflow.

    python pipelines/align.py [--config configs/demo.yaml] [--address ADDR] [section.key=value ...]
    ray job submit --working-dir . -- python pipelines/align.py --config configs/tiny.yaml

Everything cheap is checked BEFORE anything is written or Ray starts (config, data paths, checkpoint, tracking
URI); a user error prints `error: <one line>` and exits 2. Re-running with the same `train.run_name` resumes:
the saved starting weights are reused, Ray Train continues from the latest checkpoint, and metrics go on in the
same MLflow run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ray_dpo import tracking
from ray_dpo.config import Config, flatten, load_config, save_config
from ray_dpo.pipeline import (  # the stages, shared with the Tune sweep
    exit_on_user_error,
    load_data,
    precompute_reference,
    resolve_paths,
    run_evaluation,
    start_ray,
    starting_weights,
    validate,
    write_synthetic,
)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/demo.yaml)")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a new local Ray)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------- main


def run(argv: list[str] | None = None) -> dict[str, str]:
    args = parse_args(argv)
    config = resolve_paths(load_config(args.config, args.overrides))
    tokenizer = validate(config)
    uri = tracking.resolve_tracking_uri(config.tracking.uri, config.output_dir)
    tracking.check_tracking_uri(uri)
    # ---- from here on things are written
    start_ray(args.address, uri)
    run_dir = Path(config.output_dir) / "runs" / config.train.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.data.synthetic == "sort":
        write_synthetic(config)
    params, experiment = flatten(config.to_dict()), config.tracking.experiment
    id_file = run_dir / "mlflow_run_id"  # a re-run of this train.run_name logs into the same MLflow run
    run_id = id_file.read_text().strip() if id_file.exists() else None
    if not (run_id and tracking.resume_run(uri, run_id, experiment=experiment, params=params)):
        run_name = config.tracking.run_name or config.train.run_name
        run_id = tracking.start_run(uri, experiment=experiment, run_name=run_name, params=params)
        id_file.write_text(run_id)
    try:
        tracking.log_artifact(uri, run_id, save_config(config, run_dir / "config.yaml"))
        out = _stages(config, tokenizer, run_dir, uri, run_id)
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    tracking.end_run(uri, run_id)
    return {"run_id": run_id, "tracking_uri": uri, **out}


def _stages(config: Config, tokenizer, run_dir: Path, uri: str, run_id: str) -> dict[str, str]:
    from ray_dpo.train import train_dpo

    train_ds, val_ds = load_data(config, tokenizer, uri, run_id)
    reference = starting_weights(config, tokenizer, run_dir, uri, run_id)
    if config.dpo.reference == "precomputed" and not config.dpo.reference_free:
        train_ds, val_ds = precompute_reference(config, [train_ds, val_ds], reference)
    result = train_dpo(
        config,
        train_ds,
        val_ds,
        run_id=run_id,
        tracking_uri=uri,
        init_checkpoint=reference,
        reference_checkpoint=reference,
        pad_id=tokenizer.pad_id,
    )
    tracking.log_artifact(uri, run_id, result.checkpoint, "checkpoints/final")
    out = {"checkpoint": result.checkpoint, "steps": str(result.steps)}
    if config.eval.enabled:
        from ray_dpo.evaluate import format_summary

        out["eval"] = format_summary(run_evaluation(config, result.checkpoint, reference, val_ds, uri, run_id))
    if config.tracking.registered_model:
        out["model_uri"] = tracking.register_model(uri, run_id, result.checkpoint, config.tracking.registered_model)
    return out


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    out = run(argv)
    print(f"MLflow run:       {out['run_id']}")
    print(f"tracking URI:     {out['tracking_uri']}")
    print(f"browse:           mlflow ui --backend-store-uri {out['tracking_uri']}")
    print(f"final checkpoint: {out['checkpoint']} ({out['steps']} steps)")
    if "model_uri" in out:
        print(f"registered model: {out['model_uri']}")
    if "eval" in out:
        print(out["eval"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
