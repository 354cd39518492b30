"""The policy as an MLflow model, and the publishing of a run's final policy: checkpoint, export, registration.

    published = publish(final_checkpoint, tracking_uri=uri, run_id=run_id, registered_model="ray-dpo-policy",
                        export_to=(storage_path, "run", "staged", "export"))    # a Ray task: the driver loads nothing
    mlflow.pyfunc.load_model("models:/ray-dpo-policy/1").predict(["sort: qbdka ="])     # greedy continuations
    model, encoding = load_registered_model("models:/ray-dpo-policy/1", uri)

Every model kind is served the same way: a pyfunc ("models from code": nothing pickled) whose artifact holds the
policy's safetensors, its tokenizer and its `encoding.json`, so `predict` encodes a prompt exactly as training did
(chat template, truncation; `ray_dpo.core.encoding`) and decodes with `ray_dpo.core.sampling.generate`.
"""

from __future__ import annotations

import fnmatch
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train import Checkpoint
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from torch import nn

from ray_dpo.core import checkpoint as layout
from ray_dpo.core.encoding import ENCODING_FILE, Encoding
from ray_dpo.core.tokenizer import ByteTokenizer, load_tokenizer
from ray_dpo.stages import models, storage, tracking
from ray_dpo.stages.tracking import TrackingError, client, one_line

POLICY_ARTIFACT = "policy"  # key of the policy's files inside the logged MLflow model
TRAINING_STATE = (
    layout.OPTIMIZER_FILE,
    layout.STATE_FILE,
    layout.SCHEDULER_FILE,
    layout.SHARDED_METADATA,
    "*.distcp",
    "manifest.*",
)

# "Models from code": MLflow stores this file in the model and runs it on load, so nothing is pickled (the
# weights are safetensors, the class comes from the installed ray-dpo package).
_MODEL_CODE = """\
import mlflow

from ray_dpo.stages.serving import make_policy_pyfunc

mlflow.models.set_model(make_policy_pyfunc())
"""


def greedy_continuations(model: nn.Module, encoding: Encoding, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuation of each prompt, encoded as in training, until eos or `max_new_tokens`: what the
    registered pyfunc's `predict` serves. Prompt + continuation fit the model's positions (prompts keep their head
    and their end)."""
    import torch

    from ray_dpo.core.sampling import generate

    tokenizer, positions = encoding.tokenizer, models.max_positions(model)
    max_new_tokens = max(1, min(int(max_new_tokens), positions - 1))
    encoded = [torch.tensor(encoding.prompt(p, positions - max_new_tokens), dtype=torch.long) for p in prompts]
    if not encoded:
        return []
    with torch.no_grad():
        out = generate(
            model, encoded, max_new_tokens, temperature=0.0, eos_token=tokenizer.eos_id, pad_id=tokenizer.pad_id
        )
    texts = []
    for row in out.tolist():
        if tokenizer.eos_id in row:
            row = row[: row.index(tokenizer.eos_id)]
        texts.append(tokenizer.decode([t for t in row if t != tokenizer.pad_id]))
    return texts


def _as_prompts(model_input: Any) -> list[str]:
    """pyfunc hands a list of strings over as a one-column DataFrame; also accept a `prompt` column or a string."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # pandas.DataFrame
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        model_input = model_input[column]
    return [str(item) for item in list(model_input)]


def load_policy(directory: str | Path) -> tuple[nn.Module, Encoding]:
    """A served policy directory: the model (ready to decode) and the encoding it was trained with."""
    model = models.load_for_inference(str(directory))
    if Encoding.saved_in(directory):
        return model, Encoding.load(directory)
    # a checkpoint saved without its encoding: its tokenizer (bytes when it has none), prompts as they come
    own = any((Path(directory) / name).is_file() for name in layout.TOKENIZER_FILES)
    tokenizer = load_tokenizer(directory) if own else ByteTokenizer()
    positions = models.max_positions(model)
    return model, Encoding(tokenizer, max_len=positions, max_prompt_len=positions)


def make_policy_pyfunc():
    """A `mlflow.pyfunc.PythonModel` serving the policy: list of prompts -> list of greedy continuations.

    Built in a function so `import ray_dpo.stages.tracking` does not import mlflow.
    """
    import mlflow.pyfunc

    # MLflow warns when a class without type hints on `predict` is defined: they are missing on purpose (below)
    warnings.filterwarnings("ignore", message=r".*type hints to the `predict` method")

    class PolicyModel(mlflow.pyfunc.PythonModel):
        def load_context(self, context) -> None:
            self.model, self.encoding = load_policy(context.artifacts[POLICY_ARTIFACT])
            self.max_new_tokens = int((context.model_config or {}).get("max_new_tokens", 64))

        # No type hints on purpose: MLflow would derive the signature from them and drop the params schema.
        def predict(self, context, model_input, params=None):
            max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
            return greedy_continuations(self.model, self.encoding, _as_prompts(model_input), max_new)

    return PolicyModel()


def _stage_policy(policy_dir: Path, into: Path) -> Path:
    """Copy what serving needs (weights, config, tokenizer, encoding; no training state) into `into/policy`."""
    policy = into / POLICY_ARTIFACT
    policy.mkdir(parents=True)
    for source in policy_dir.iterdir():
        if source.is_file() and not any(fnmatch.fnmatch(source.name, pattern) for pattern in TRAINING_STATE):
            shutil.copy2(source, policy / source.name)
    return policy


def _pip_requirements(extra: tuple[str, ...] = ()) -> list[str]:
    # Explicit, so MLflow does not load the model in a subprocess to infer them (slow, and it would miss ray-dpo).
    from importlib.metadata import PackageNotFoundError, version

    requirements = []
    for package in ("mlflow", "torch", "safetensors", "einops", "numpy", "pyyaml", "ray-dpo", *extra):
        try:
            requirements.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            requirements.append(package)
    return requirements


def register_model(
    uri: str,
    run_id: str,
    policy_dir: str | Path,
    name: str | None,
    *,
    max_new_tokens: int = 64,
    await_registration_s: int = 60,
) -> str:
    """Log a policy directory of whole weights (ours or a Hugging Face model, with its tokenizer and encoding) as
    an MLflow pyfunc model of `run_id` and register it as `name`.

    MLflow 3 layout: a LoggedModel (`models:/<model_id>`, listed under the run's outputs and the experiment's
    Models tab) holding `artifacts/policy/` (safetensors, config, tokenizer, `encoding.json`). Built with the client
    API, not `mlflow.pyfunc.log_model`, which only works against the global tracking URI and active run.
    Returns `models:/<name>/<version>`, or `models:/<model_id>` when `name` is None.
    """

    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model, infer_signature

    policy_dir = Path(policy_dir)
    kind = models.kind(policy_dir)
    if kind not in ("ours", "hf"):
        raise TrackingError(f"tracking: cannot register {policy_dir}: a {kind} checkpoint (merge or gather it first)")
    mlflow_client = client(uri)
    run = mlflow_client.get_run(run_id)
    logged = mlflow_client.create_logged_model(
        run.info.experiment_id, name=POLICY_ARTIFACT, source_run_id=run_id, model_type="ray-dpo-policy"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="ray-dpo-model-") as tmp:
            tmp_path = Path(tmp)
            local = tmp_path / "model"
            # Explicit signature: one inferred from type hints has no params schema, so `max_new_tokens` passed
            # to predict(..., params=...) would be dropped. An input example would only re-run predict: not given.
            signature = infer_signature(["a prompt"], ["a response"], params={"max_new_tokens": max_new_tokens})
            mlflow_model = Model(
                artifact_path=logged.artifact_location,
                model_uuid=logged.model_id,
                run_id=run_id,
                model_id=logged.model_id,
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*input example was not provided")
                policy = _stage_policy(policy_dir, tmp_path / "stage")
                code = tmp_path / "ray_dpo_policy_model.py"
                code.write_text(_MODEL_CODE)
                extra = ("transformers", "tokenizers") if kind == "hf" else ()
                mlflow.pyfunc.save_model(
                    str(local),
                    python_model=str(code),
                    artifacts={POLICY_ARTIFACT: str(policy)},
                    model_config={"max_new_tokens": max_new_tokens},
                    signature=signature,
                    pip_requirements=_pip_requirements(extra),
                    mlflow_model=mlflow_model,
                )
            mlflow_client.log_model_artifacts(logged.model_id, str(local))
        mlflow_client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        mlflow_client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        mlflow_client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    if name is None:
        return f"models:/{logged.model_id}"
    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise TrackingError(f"tracking: cannot register model {name!r} in {uri}: {one_line(err)}") from None
    version = mlflow_client.create_model_version(
        name,
        # The storage location, not `models:/<model_id>`: the SQL registry resolves the latter through the GLOBAL
        # tracking URI (an MLflow TODO), i.e. ./mlflow.db rather than `uri`.
        source=logged.artifact_location,
        run_id=run_id,
        model_id=logged.model_id,
        await_creation_for=await_registration_s,
    )
    return f"models:/{name}/{version.version}"


def download_model(model_uri: str, tracking_uri: str, dst_path: str | Path | None = None) -> Path:
    """Download an MLflow model (`models:/name/version`, `models:/name@alias`, `models:/<model_id>`, `runs:/...`).

    `models:/` URIs are resolved here with a client bound to `tracking_uri`: MLflow's own resolver
    (`ModelsArtifactRepository`) looks them up in the GLOBAL registry URI, ignoring the one it is given.
    """
    from mlflow.artifacts import download_artifacts as _download
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    try:
        artifact_uri = model_uri
        if ModelsArtifactRepository.is_models_uri(model_uri):
            mlflow_client = client(tracking_uri)
            base, sub_path = ModelsArtifactRepository.split_models_uri(model_uri)
            found = get_model_name_and_version(mlflow_client, base)
            if len(found) == 1:  # models:/<model_id>
                artifact_uri = mlflow_client.get_logged_model(found[0]).artifact_location
            else:
                artifact_uri = mlflow_client.get_model_version_download_uri(*found)
            if sub_path:
                artifact_uri = artifact_uri.rstrip("/") + "/" + sub_path
        local = _download(artifact_uri=artifact_uri, dst_path=dst_path, tracking_uri=tracking_uri)
    except Exception as err:  # MlflowException, or an OSError from the artifact store
        raise TrackingError(f"tracking: cannot download {model_uri} from {tracking_uri}: {one_line(err)}") from None
    return Path(local)


def _find_policy_dir(local: Path) -> Path:
    for candidate in (local / "artifacts" / POLICY_ARTIFACT, local / POLICY_ARTIFACT, local):
        if (candidate / ENCODING_FILE).is_file() or (candidate / layout.WEIGHTS_FILE).is_file():
            return candidate
    raise TrackingError(f"tracking: {local} holds no ray-dpo policy")


def load_registered_model(model_uri: str, tracking_uri: str, device: str = "cpu") -> tuple[nn.Module, Encoding]:
    """Download `model_uri` and load the policy (safetensors, never pickle) with the encoding it was trained with."""
    with tempfile.TemporaryDirectory(prefix="ray-dpo-download-") as tmp:
        model, encoding = load_policy(_find_policy_dir(download_model(model_uri, tracking_uri, tmp)))
        return model.to(device), encoding  # both load fully into memory: the download can go


def load_pyfunc(model_uri: str, tracking_uri: str, dst_path: str | Path | None = None):
    """`mlflow.pyfunc.load_model` for a model in `tracking_uri` (downloaded first: the fluent loader only knows the
    global URI). Keep `dst_path` while the model is in use when given; otherwise a fresh temporary directory is used.
    """
    import mlflow.pyfunc

    if dst_path is None:
        dst_path = tempfile.mkdtemp(prefix="ray-dpo-pyfunc-")
    return mlflow.pyfunc.load_model(str(download_model(model_uri, tracking_uri, dst_path)))


# ------------------------------------------------------------------------------------------------ publishing


@dataclass(frozen=True)
class Published:
    model_uri: str | None  # the registered (or logged) MLflow model
    export: str | None  # a Hugging Face policy as a plain Hugging Face directory in storage (LoRA merged)


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """A Hugging Face policy as plain Hugging Face directories: `model/` (LoRA merged into its base; safetensors,
    tokenizer, chat template and `encoding.json`: `AutoModelForCausalLM.from_pretrained` loads it) and, for LoRA,
    `adapter/` alone."""
    out = {"model": Path(out_dir) / "model"}
    encoding = models.load_encoding(str(checkpoint_dir))
    models.save(out["model"], models.merged(models.load(str(checkpoint_dir))), encoding=encoding)
    if models.kind(checkpoint_dir) == "adapter":
        out["adapter"] = Path(out_dir) / "adapter"
        shutil.copytree(checkpoint_dir, out["adapter"], ignore=shutil.ignore_patterns(*TRAINING_STATE))
    return out


@ray.remote
def _publish(checkpoint: Checkpoint, uri: str, run_id: str, name: str | None, export_to: tuple | None) -> Published:
    with storage.local_directory(checkpoint) as final, tempfile.TemporaryDirectory(prefix="ray-dpo-publish-") as tmp:
        tracking.log_artifact(uri, run_id, final, "checkpoints/final")
        policy_dir, export = Path(final), None
        if models.kind(final) not in ("ours", "hf"):  # adapters merged, or shards gathered: whole weights to serve
            policy_dir = export_hf(final, Path(tmp) / "export")["model"]
        if models.kind(policy_dir) == "hf":  # your model back in its own format: what is served too
            if policy_dir == Path(final):
                shutil.copytree(final, Path(tmp) / "export" / "model", ignore=shutil.ignore_patterns(*TRAINING_STATE))
            tracking.log_artifact(uri, run_id, Path(tmp) / "export", "export")
            if export_to is not None:
                staged = storage.stage_directory(Path(tmp) / "export", export_to[0], *export_to[1:])
                export = f"{storage.checkpoint_uri(staged)}/model"
        model_uri = register_model(uri, run_id, policy_dir, name)
    return Published(model_uri, export)


def publish(
    checkpoint: Checkpoint,
    *,
    tracking_uri: str,
    run_id: str,
    registered_model: str | None,
    export_to: tuple[str, ...] | None,
    use_gpu: bool = False,
) -> Published:
    """The final checkpoint into the MLflow run, a Hugging Face policy exported (into `export_to`: storage path and
    parts) and the policy registered, all in one Ray task: the driver loads no weights. A local MLflow store
    (SQLite) lives on the driver's disk, so the task then runs on the driver's node."""
    placement: dict[str, Any] = {"num_cpus": 0.5, "num_gpus": 1 if use_gpu else 0}
    if tracking.is_local_store(tracking_uri):
        here = ray.get_runtime_context().get_node_id()
        placement = {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)}
    return ray.get(_publish.options(**placement).remote(checkpoint, tracking_uri, run_id, registered_model, export_to))
