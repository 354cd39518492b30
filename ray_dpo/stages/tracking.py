"""MLflow tracking: runs, params, metrics, artifacts and tables (with `stages.serving`, the only modules that import
mlflow), and the redaction of credentials before anything reaches MLflow.

One run per align job, logged from the driver (the workers report to it) and, for the final policy, from the
publishing task. Every call takes the tracking URI and
builds its own `MlflowClient(tracking_uri=uri)`: no global MLflow state, so the same functions work in the driver,
in a Ray Train worker and inside a Tune trial (each a different process with a different working directory).

    uri = resolve_tracking_uri(cfg.tracking.uri, cfg.output_dir)
    check_tracking_uri(uri)                       # before training: one-line TrackingError if unusable
    run_id = start_run(uri, experiment="ray-dpo", run_name="demo", params=cfg.to_dict())
    log_metrics(uri, run_id, {"train/loss": 0.69}, step=1)
    end_run(uri, run_id)

Packaging the policy as an MLflow model (register, download, serve) is `ray_dpo.stages.serving`.

mlflow is imported inside the functions: it costs seconds to import and `resolve_tracking_uri` /
`check_tracking_uri` run before anything else in a pipeline (and must stay cheap there).
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray_dpo.errors import UserError

if TYPE_CHECKING:
    import pandas

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
PARENT_RUN_TAG = "mlflow.parentRunId"  # what the MLflow UI uses to nest runs (Tune trials under a sweep)
EARLY_STOPPED_TAG = "ray_dpo.early_stopped"
HEALTH_TIMEOUT_S = 3.0
# MLflow's store limits (mlflow.utils.validation): params and tags per log_batch, metrics per log_batch.
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE = 6000
_RUN_STATUSES = ("FINISHED", "FAILED", "KILLED", "RUNNING", "SCHEDULED")
_DB_SCHEMES = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}  # SQLAlchemy stores MLflow accepts


class TrackingError(UserError):
    """The tracking URI (or a run / model in it) is unusable. The message is one line naming the URI."""

    def __init__(self, message: str):
        super().__init__(redact(" ".join(str(message).split())))  # one line, no credentials


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------------------------------------------------------
# URIs
# ---------------------------------------------------------------------------------------------------------------


# Credentials in a URI never reach MLflow (params, config.yaml, tags, the command line): userinfo (`user:password@`)
# and query parameters that carry secrets (tokens, keys, signatures) are replaced by `***`.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s?#]+)@")
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&;][^=&\s]*(?:token|secret|passw|pwd|key|signature|sig|credential|auth)[^=&\s]*=)(?P<value>[^&\s#]*)",
    re.IGNORECASE,
)


def redact(text: str | None) -> str | None:
    """`text` with the credentials of every URI in it replaced by `***`."""
    if not isinstance(text, str):
        return text
    return _SECRET_PARAM.sub(r"\g<key>***", _USERINFO.sub(r"\g<scheme>***@", text))


def redacted(values: Mapping[str, Any]) -> dict[str, Any]:
    """A mapping with every string value (nested too) redacted."""
    out = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out[key] = redacted(value)
        elif isinstance(value, list):
            out[key] = [redact(v) if isinstance(v, str) else v for v in value]
        else:
            out[key] = redact(value) if isinstance(value, str) else value
    return out


def redacted_config(config):
    """The config as it may be shown and logged: every credential in a URI replaced by `***`."""
    from ray_dpo.config import config_from_dict

    return config_from_dict(redacted(config.to_dict()))


def is_local_store(uri: str) -> bool:
    """A store on this machine's disk (SQLite): only processes on this node can write to it."""
    return _sqlite_path(uri) is not None


def resolve_tracking_uri(configured: str | None, output_dir: str | Path) -> str:
    """`MLFLOW_TRACKING_URI` if set, else `configured`, else `sqlite:///<abs output_dir>/mlflow.db`.

    A relative SQLite path is made absolute against the current directory: Ray Train workers run in a session
    directory of their own, where a relative path would open a different (empty) store.
    """
    uri = os.environ.get(TRACKING_URI_ENV) or configured
    if not uri:
        return f"sqlite:///{Path(output_dir).expanduser().resolve() / 'mlflow.db'}"
    db = _sqlite_path(uri)
    if db is not None and db != ":memory:" and not os.path.isabs(db):
        return f"sqlite:///{Path(db).resolve()}"
    return uri


def _sqlite_path(uri: str) -> str | None:
    """The database path of a `sqlite://` URI (`sqlite:////abs/x.db` -> `/abs/x.db`), else None."""
    if not uri.startswith("sqlite:"):
        return None
    path = uri[len("sqlite:") :]
    if path in ("", "//", "///", "///:memory:", "//:memory:"):
        return ":memory:"
    if not path.startswith("///"):
        return path.lstrip("/")  # malformed (sqlite:/x.db); checked by check_tracking_uri
    return urllib.parse.unquote(path[3:].split("?", 1)[0])


def sqlite_artifact_root(uri: str) -> Path | None:
    """`<db dir>/mlartifacts` (absolute) for a SQLite store, else None (a server or database picks its own)."""
    db = _sqlite_path(uri)
    if db is None or db == ":memory:":
        return None
    return Path(db).expanduser().resolve().parent / "mlartifacts"


def check_tracking_uri(uri: str) -> None:
    """Raise `TrackingError` (one line) unless MLflow can log to `uri`. Writes nothing, takes at most a few seconds.

    http(s): the server answers `GET /health`. sqlite: the database file (or the directory it will be created in)
    is writable. postgresql/mysql/mssql: the host accepts TCP connections. Anything else is refused.
    """
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    base_scheme = scheme.split("+", 1)[0]  # postgresql+psycopg2 -> postgresql
    if scheme in ("http", "https"):
        _check_server(uri)
    elif scheme == "sqlite":
        _check_sqlite(uri)
    elif base_scheme in _DB_SCHEMES:
        _check_tcp(uri, _DB_SCHEMES[base_scheme])
    elif scheme == "file" or scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        raise TrackingError(
            f"tracking: {uri!r} is a file store, which MLflow 3 refuses (maintenance mode); "
            f"use sqlite:////abs/path/mlflow.db or an http(s):// MLflow server"
        )
    else:
        raise TrackingError(
            f"tracking: unsupported tracking URI scheme {scheme!r} in {uri!r} "
            f"(supported: http(s)://, sqlite:///, postgresql://, mysql://, mssql://)"
        )


def _check_server(uri: str) -> None:
    parts = urllib.parse.urlsplit(uri.rstrip("/") + "/health")
    netloc = parts.netloc.rsplit("@", 1)[-1]  # credentials go in a header, as MLflow's client sends them
    request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=netloc)))
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=HEALTH_TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        raise TrackingError(
            f"tracking: MLflow server {uri} is unreachable (GET /health: {one_line(reason)}); "
            f"start it or set {TRACKING_URI_ENV} / tracking.uri"
        ) from None
    if status != 200:
        raise TrackingError(f"tracking: MLflow server {uri} is not healthy (GET /health returned HTTP {status})")


def _check_sqlite(uri: str) -> None:
    db = _sqlite_path(uri)
    if db == ":memory:":
        raise TrackingError(
            f"tracking: {uri!r} is an in-memory SQLite store: Ray workers and later runs cannot see it; "
            f"use sqlite:////abs/path/mlflow.db"
        )
    if not uri.startswith("sqlite:///"):
        raise TrackingError(f"tracking: malformed SQLite URI {uri!r} (expected sqlite:////abs/path/mlflow.db)")
    path = Path(db).expanduser().absolute()
    if path.exists():
        if not path.is_file():
            raise TrackingError(f"tracking: SQLite store {uri!r}: {path} exists and is not a file")
        if not os.access(path, os.R_OK | os.W_OK):
            raise TrackingError(f"tracking: SQLite store {uri!r}: {path} is not writable")
        return
    # The database and its directories are created on first use: the nearest existing ancestor must allow it.
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise TrackingError(f"tracking: SQLite store {uri!r}: cannot create {path.parent} ({ancestor} is a file)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise TrackingError(f"tracking: SQLite store {uri!r}: cannot create {path} ({ancestor} is not writable)")


def _check_tcp(uri: str, default_port: int) -> None:
    parts = urllib.parse.urlsplit(uri)
    host, port = parts.hostname or "localhost", parts.port or default_port
    try:
        socket.create_connection((host, port), timeout=HEALTH_TIMEOUT_S).close()
    except OSError as err:
        safe = uri.replace(f":{parts.password}@", ":***@") if parts.password else uri
        raise TrackingError(f"tracking: database {safe} is unreachable at {host}:{port} ({one_line(err)})") from None


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# ---------------------------------------------------------------------------------------------------------------
# Runs, params, metrics
# ---------------------------------------------------------------------------------------------------------------


def get_or_create_experiment(uri: str, name: str) -> str:
    """Experiment id of `name`, created with an explicit artifact location when missing.

    For SQLite the location is `<db dir>/mlartifacts` (absolute): without one MLflow uses `./mlruns` relative to
    whichever process created the experiment (a Ray worker's session directory). A server decides itself
    (`--artifacts-destination`).
    """
    from mlflow.exceptions import MlflowException

    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        root = sqlite_artifact_root(uri)
        try:
            return mlflow_client.create_experiment(name, artifact_location=root.as_uri() if root else None)
        except MlflowException as err:
            # Another process (a parallel Tune trial) created it between our lookup and create.
            experiment = mlflow_client.get_experiment_by_name(name)
            if experiment is None:
                raise TrackingError(f"tracking: cannot create experiment {name!r} in {uri}: {one_line(err)}") from None
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"tracking: experiment {name!r} in {uri} is deleted; restore it (mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}) or choose another tracking.experiment"
        )
    return experiment.experiment_id


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= _MAX_PARAM_VALUE else text[: _MAX_PARAM_VALUE - 3] + "..."


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params, nested mappings flattened to dotted keys (`train.lr`), in batches within MLflow's limits."""
    from mlflow.entities import Param

    from ray_dpo.config import flatten

    flat = flatten(dict(params))
    items = [Param(str(key), _param_value(value)) for key, value in flat.items()]
    mlflow_client = client(uri)
    for start in range(0, len(items), _PARAMS_PER_BATCH):
        mlflow_client.log_batch(run_id, params=items[start : start + _PARAMS_PER_BATCH])


def set_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(str(key), _param_value(value)) for key, value in tags.items()]
    mlflow_client = client(uri)
    for start in range(0, len(items), _PARAMS_PER_BATCH):
        mlflow_client.log_batch(run_id, tags=items[start : start + _PARAMS_PER_BATCH])


def delete_tag(uri: str, run_id: str, key: str) -> None:
    """Remove tag `key` from the run if it has it."""
    mlflow_client = client(uri)
    if key in mlflow_client.get_run(run_id).data.tags:
        mlflow_client.delete_tag(run_id, key)


def start_run(
    uri: str,
    *,
    experiment: str,
    run_name: str | None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Create a run (and the experiment if missing); log `params` flattened. Returns the run id.

    `parent_run_id` nests the run under another (a Tune trial under its sweep run) via the `mlflow.parentRunId` tag.
    """
    all_tags = {str(k): _param_value(v) for k, v in (tags or {}).items()}
    if parent_run_id is not None:
        all_tags[PARENT_RUN_TAG] = parent_run_id
    experiment_id = get_or_create_experiment(uri, experiment)
    run = client(uri).create_run(experiment_id, tags=all_tags, run_name=run_name)
    run_id = run.info.run_id
    if params:
        log_params(uri, run_id, params)
    return run_id


def find_child_run(uri: str, parent_run_id: str, tags: Mapping[str, Any]) -> str | None:
    """The run nested under `parent_run_id` whose tags hold `tags` (a retried or restored sweep trial's own run)."""
    mlflow_client = client(uri)
    experiment_id = mlflow_client.get_run(parent_run_id).info.experiment_id
    wanted = {PARENT_RUN_TAG: parent_run_id, **{str(k): _param_value(v) for k, v in tags.items()}}
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in wanted.items())
    runs = mlflow_client.search_runs([experiment_id], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def resume_run(uri: str, run_id: str, *, experiment: str, params: Mapping[str, Any] | None = None) -> bool:
    """Reopen run `run_id` of `experiment` (RUNNING again) so a re-run of the same job continues its metric history.

    Params the run lacks are logged. MLflow params are immutable, so a param whose value changed keeps its first
    value and the new one is recorded as tag `ray_dpo.resumed.<key>`. False (nothing changed) if `uri` holds no
    such active run: it was deleted, lives in another experiment, or the store is a different one.
    """
    from mlflow.exceptions import MlflowException

    from ray_dpo.config import flatten

    mlflow_client = client(uri)
    try:
        run = mlflow_client.get_run(run_id)
        wanted = mlflow_client.get_experiment_by_name(experiment)
    except MlflowException:
        return False
    if run.info.lifecycle_stage != "active" or wanted is None or run.info.experiment_id != wanted.experiment_id:
        return False
    mlflow_client.update_run(run_id, status="RUNNING")
    new = {key: _param_value(value) for key, value in flatten(dict(params or {})).items()}
    old = run.data.params
    log_params(uri, run_id, {key: value for key, value in new.items() if key not in old})
    set_tags(uri, run_id, {f"ray_dpo.resumed.{key}": v for key, v in new.items() if key in old and old[key] != v})
    return True


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log one step of metrics in a single `log_batch`."""
    from mlflow.entities import Metric

    timestamp = int(time.time() * 1000)
    items = [Metric(str(key), float(value), timestamp, int(step or 0)) for key, value in metrics.items()]
    mlflow_client = client(uri)
    for start in range(0, len(items), _METRICS_PER_BATCH):
        mlflow_client.log_batch(run_id, metrics=items[start : start + _METRICS_PER_BATCH])


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run terminated: FINISHED, FAILED or KILLED (an early-stopped trial: FINISHED + `mark_early_stopped`)."""
    if status not in _RUN_STATUSES:
        raise TrackingError(f"tracking: run status must be one of {list(_RUN_STATUSES)}, got {status!r}")
    client(uri).set_terminated(run_id, status=status)


def mark_early_stopped(uri: str, run_id: str, reason: str = "scheduler") -> None:
    """Tag a run stopped by a Tune scheduler (ASHA): it did not fail, it just lost; filter on this tag in the UI."""
    set_tags(uri, run_id, {EARLY_STOPPED_TAG: "true", f"{EARLY_STOPPED_TAG}.reason": reason})


# ---------------------------------------------------------------------------------------------------------------
# Artifacts
# ---------------------------------------------------------------------------------------------------------------


def log_artifact(uri: str, run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
    """Upload a file, or a directory's contents, under `artifact_path` of the run."""
    path = Path(local_path)
    mlflow_client = client(uri)
    if path.is_dir():
        mlflow_client.log_artifacts(run_id, str(path), artifact_path)
    elif path.is_file():
        mlflow_client.log_artifact(run_id, str(path), artifact_path)
    else:
        raise TrackingError(f"tracking: cannot log artifact {path}: no such file or directory")


def log_dict(uri: str, run_id: str, obj: Any, artifact_file: str) -> None:
    """JSON or YAML (by the extension of `artifact_file`)."""
    client(uri).log_dict(run_id, obj, artifact_file)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    client(uri).log_text(run_id, text, artifact_file)


def log_table(uri: str, run_id: str, data: dict[str, list] | pandas.DataFrame, artifact_file: str) -> None:
    """A table artifact (`.json`), shown in the UI's evaluation view; read back with `load_table`."""
    client(uri).log_table(run_id, data, artifact_file)


def load_table(uri: str, run_id: str, artifact_file: str) -> pandas.DataFrame:
    """The table `artifact_file` of one run, read from `uri`.

    Not `mlflow.load_table` / `MlflowClient.load_table`: both find the run through `mlflow.search_runs`, which uses
    the GLOBAL tracking URI (with none set that creates `./mlflow.db`), whatever the client was built with.
    """
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="ray-dpo-table-") as tmp:
        try:
            local = client(uri).download_artifacts(run_id, artifact_file, tmp)
        except Exception as err:  # MlflowException or OSError from the artifact store
            raise TrackingError(
                f"tracking: cannot read table {artifact_file} of run {run_id} in {uri}: {one_line(err)}"
            ) from None
        if artifact_file.endswith(".parquet"):
            return pd.read_parquet(local)
        return pd.read_json(local, orient="split")  # the layout MlflowClient.log_table writes


def download_artifacts(uri: str, run_id: str, artifact_path: str, dst_path: str | Path | None = None) -> Path:
    from mlflow.artifacts import download_artifacts as _download

    return Path(
        _download(run_id=run_id, artifact_path=artifact_path, dst_path=dst_path, tracking_uri=uri, registry_uri=uri)
    )


def last_steps(uri: str, run_id: str) -> dict[str, int]:
    """The last logged step of every metric of a run: what a resumed job must not log again."""
    mlflow_client = client(uri)
    keys = mlflow_client.get_run(run_id).data.metrics
    return {key: max(m.step for m in mlflow_client.get_metric_history(run_id, key)) for key in keys}


def log_dataset(uri: str, run_id: str, *, name: str, source: str, digest: str, context: str) -> None:
    """A run input ("Datasets" panel of the UI): where the data came from and a digest of its content."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    dataset = MetaDataset(resolve_dataset_source(source), name=name, digest=digest[:36])
    tags = [InputTag("mlflow.data.context", context)]
    client(uri).log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])


def start_system_metrics(uri: str, run_id: str, sampling_interval_s: float = 10.0):
    """CPU, memory, disk, network (and GPU with pynvml) as `system/*` metrics of the run until `.finish()`."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval_s, resume_logging=True, tracking_uri=uri)
    monitor.start()
    return monitor
