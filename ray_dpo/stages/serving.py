"""The policy as an MLflow model: register a checkpoint (safetensors, no pickle), download it, serve it.

    model_uri = register_model(uri, run_id, checkpoint_dir, "ray-dpo-policy")   # models:/ray-dpo-policy/1
    model, tokenizer = load_registered_model(model_uri, uri)
    mlflow.pyfunc.load_model(...).predict(["sort: qbdka ="])                    # greedy continuations

Prompts are encoded as in training (`ray_dpo.core.encoding.encode_prompt`) and decoded with `ray_dpo.core.sampling`.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray_dpo.stages import models
from ray_dpo.stages.tracking import TrackingError, client, one_line

if TYPE_CHECKING:
    from ray_dpo.core.model import TransformerLM
    from ray_dpo.core.tokenizer import ByteTokenizer, HFTokenizer

POLICY_FILES = ("model.safetensors", "model_config.json", "tokenizer.json")  # what a served policy needs
POLICY_ARTIFACT = "policy"  # key of the checkpoint files inside the logged MLflow model

# ---------------------------------------------------------------------------------------------------------------

# "Models from code": MLflow stores this file in the model and runs it on load, so nothing is pickled (the
# weights are safetensors, the class comes from the installed ray-dpo package).
_MODEL_CODE = """\
import mlflow

from ray_dpo.stages.serving import make_policy_pyfunc

mlflow.models.set_model(make_policy_pyfunc())
"""


def greedy_continuations(
    model: TransformerLM, tokenizer: ByteTokenizer | HFTokenizer, prompts: list[str], max_new_tokens: int
) -> list[str]:
    """Greedy continuation of each prompt (bos + prompt, as in training) until eos or `max_new_tokens`.

    What the registered pyfunc's `predict` serves. Prompt + continuation fit the model's `max_seq_len` (its RoPE
    tables and KV cache): at most `max_seq_len - 1` new tokens, prompts keep their last tokens.
    """
    import torch

    from ray_dpo.core.encoding import encode_prompt
    from ray_dpo.core.sampling import generate

    max_new_tokens = max(1, min(int(max_new_tokens), model.config.max_seq_len - 1))
    room = model.config.max_seq_len - max_new_tokens
    encoded = [torch.tensor(encode_prompt(tokenizer, p, room), dtype=torch.long) for p in prompts]
    if not encoded:
        return []
    model.eval()
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


def make_policy_pyfunc():
    """A `mlflow.pyfunc.PythonModel` serving the policy: list of prompts -> list of greedy continuations.

    Built in a function so `import ray_dpo.stages.tracking` does not import mlflow.
    """
    import mlflow.pyfunc

    # MLflow warns when a class without type hints on `predict` is defined: they are missing on purpose (above)
    warnings.filterwarnings("ignore", message=r".*type hints to the `predict` method")

    class PolicyModel(mlflow.pyfunc.PythonModel):
        def load_context(self, context) -> None:
            from ray_dpo.core.checkpoint import load_model
            from ray_dpo.core.tokenizer import load_tokenizer

            policy_dir = context.artifacts[POLICY_ARTIFACT]
            self.model = load_model(policy_dir).eval()
            self.tokenizer = load_tokenizer(policy_dir)
            self.max_new_tokens = int((context.model_config or {}).get("max_new_tokens", 64))

        # No type hints on purpose: MLflow would derive the signature from them and drop the params schema.
        def predict(self, context, model_input, params=None):
            max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
            return greedy_continuations(self.model, self.tokenizer, _as_prompts(model_input), max_new)

    return PolicyModel()


def _stage_policy(checkpoint_dir: Path, into: Path) -> Path:
    """Copy only what serving needs (no optimizer state) into `into/policy`; the tokenizer spec defaults to bytes."""
    import shutil

    policy = into / POLICY_ARTIFACT
    policy.mkdir(parents=True)
    for name in POLICY_FILES:
        source = checkpoint_dir / name
        if source.is_file():
            shutil.copy2(source, policy / name)
        elif name == "tokenizer.json":
            (policy / name).write_text(json.dumps({"type": "byte"}))  # a checkpoint saved without its tokenizer
        else:
            raise TrackingError(f"tracking: cannot register {checkpoint_dir}: {name} is missing")
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
    checkpoint_dir: str | Path,
    name: str | None,
    *,
    max_new_tokens: int = 64,
    await_registration_s: int = 60,
) -> str:
    """Log the checkpoint's policy as an MLflow pyfunc model of `run_id` and register it as `name`.

    MLflow 3 layout: a LoggedModel (`models:/<model_id>`, listed under the run's outputs and the experiment's
    Models tab) holding `artifacts/policy/{model.safetensors, model_config.json, tokenizer.json}`. Built with the
    client API, not `mlflow.pyfunc.log_model`, which only works against the global tracking URI and active run.
    Returns `models:/<name>/<version>`, or `models:/<model_id>` when `name` is None.
    """

    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model, infer_signature

    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise TrackingError(f"tracking: cannot register {checkpoint_dir}: not a directory")
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
                if models.kind(checkpoint_dir) == "ours":
                    policy = _stage_policy(checkpoint_dir, tmp_path / "stage")
                    code = tmp_path / "ray_dpo_policy_model.py"
                    code.write_text(_MODEL_CODE)
                    mlflow.pyfunc.save_model(
                        str(local),
                        python_model=str(code),
                        artifacts={POLICY_ARTIFACT: str(policy)},
                        model_config={"max_new_tokens": max_new_tokens},
                        signature=signature,
                        pip_requirements=_pip_requirements(),
                        mlflow_model=mlflow_model,
                    )
                else:  # a Hugging Face model: MLflow's transformers flavor (a text-generation pipeline)
                    import mlflow.transformers

                    model, tokenizer = models.load_with_tokenizer(str(checkpoint_dir), str(checkpoint_dir))
                    mlflow.transformers.save_model(
                        transformers_model={"model": model, "tokenizer": tokenizer.hf},
                        path=str(local),
                        task="text-generation",
                        signature=signature,
                        pip_requirements=_pip_requirements(("transformers", "tokenizers", "accelerate")),
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
    for candidate in (local, local / "artifacts" / POLICY_ARTIFACT, local / POLICY_ARTIFACT):
        if (candidate / POLICY_FILES[0]).is_file():
            return candidate
    raise TrackingError(f"tracking: {local} holds no {POLICY_FILES[0]} (not a ray-dpo policy model)")


def load_registered_model(
    model_uri: str, tracking_uri: str, device: str = "cpu"
) -> tuple[TransformerLM, ByteTokenizer | HFTokenizer]:
    """Download `model_uri` and rebuild our `TransformerLM` (safetensors, never pickle) and its tokenizer."""
    from ray_dpo.core.checkpoint import load_model
    from ray_dpo.core.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="ray-dpo-download-") as tmp:
        policy = _find_policy_dir(download_model(model_uri, tracking_uri, tmp))
        model = load_model(policy, device=device).eval()
        tokenizer = load_tokenizer(policy)  # both load fully into memory: the download can go
    return model, tokenizer


def load_pyfunc(model_uri: str, tracking_uri: str, dst_path: str | Path | None = None):
    """`mlflow.pyfunc.load_model` for a model in `tracking_uri` (downloaded first: the fluent loader only knows the
    global URI). Keep `dst_path` while the model is in use when given; otherwise a fresh temporary directory is used.
    """
    import mlflow.pyfunc

    if dst_path is None:
        dst_path = tempfile.mkdtemp(prefix="ray-dpo-pyfunc-")
    return mlflow.pyfunc.load_model(str(download_model(model_uri, tracking_uri, dst_path)))


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """The trained policy as Hugging Face directories: `model/` (LoRA merged into its base; safetensors, tokenizer,
    chat template: `AutoModelForCausalLM.from_pretrained` loads it) and, for LoRA, `adapter/` alone."""
    out = {"model": Path(out_dir) / "model"}
    model, tokenizer = models.load_with_tokenizer(str(checkpoint_dir), str(checkpoint_dir))
    models.save(out["model"], model, tokenizer=tokenizer)
    if models.kind(checkpoint_dir) == "adapter":
        import shutil

        out["adapter"] = Path(out_dir) / "adapter"
        shutil.copytree(checkpoint_dir, out["adapter"])
    return out
