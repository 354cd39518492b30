"""The one model loader: train workers, the reference pass, evaluation actors, SFT, export and serving load and
save weights here, from a local directory or a checkpoint in storage (`ray.train.Checkpoint` or a URI, downloaded
when remote). Every kind of directory the trainer writes loads (`ray_dpo.core.checkpoint`'s layout): ours, a Hugging
Face model, LoRA adapters on their staged base, an FSDP sharded checkpoint.

Hugging Face models are held with fp32 master weights; a frozen reference may be held in bf16 (half the memory).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from ray.train import Checkpoint
from torch import nn

from ray_dpo.core import checkpoint as layout
from ray_dpo.core.encoding import ENCODING_FILE, Encoding
from ray_dpo.core.kinds import is_hf, is_peft, peft_base
from ray_dpo.stages import storage
from ray_dpo.stages.storage import local_directory


def reuse_freed_memory() -> bool:
    """Keep the memory glibc's malloc frees in the process for the next step or batch: True where it took (glibc).
    Every process that runs a model calls it: train workers, the reference pass, evaluation actors.

    By default glibc hands freed blocks back to the OS (its mmap and trim thresholds), so every step pays page
    faults to get its activations back: 37-45 thousand per eager bf16 DPO step of benchmarks/dpo_step.py's
    synthetic shape on a 2-core CPU, 10% of the step (4% compiled); 40-60 thousand per batch of 16 HH-RLHF pairs
    scored in fp32, 13%. Blocks above 32 MiB (glibc's largest mmap threshold) still come from and go back to the
    OS; up to 1 GiB of freed memory stays in the process.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def return_freed_memory() -> bool:
    """Hand the heap memory freed so far back to the OS (glibc's `malloc_trim`): True when some went back.

    FSDP workers call it after each optimizer step. `reuse_freed_memory` keeps up to 1 GiB of freed blocks for the
    next step, which FSDP's many per-block all-gather and gradient buffers (each below the mmap threshold) fill:
    on benchmarks/scale.py's 0.27B model that retention alone lifted an FSDP rank's peak from 0.59x to 0.72x of a
    DDP rank's. A strategy chosen to fit a model gives that memory back; the next step pays the page faults.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))


def file_names(source: str | Path | Checkpoint) -> set[str]:
    """The file names of a checkpoint directory, local or in storage (listed: nothing downloaded)."""
    if isinstance(source, (str, Path)) and not storage.is_uri(str(source)):
        return {p.name for p in Path(source).iterdir()} if Path(source).is_dir() else set()
    checkpoint = storage.as_checkpoint(str(source) if isinstance(source, Path) else source)
    infos = checkpoint.filesystem.get_file_info(pafs.FileSelector(checkpoint.path, allow_not_found=True))
    return {i.path.rsplit("/", 1)[-1] for i in infos if i.type == pafs.FileType.File}


def kind(source: str | Path | Checkpoint) -> layout.DirectoryKind:
    """What a checkpoint directory holds, local or in storage, read from its file names (nothing downloaded)."""
    if isinstance(source, (str, Path)) and not storage.is_uri(str(source)):
        return layout.local_kind(source)
    found = layout.directory_kind(file_names(source))
    if found is None:
        raise ValueError("not a model checkpoint (no model_config.json, config.json, adapter_config.json or .metadata)")
    return found


def load(
    source: str | Checkpoint, device: str | torch.device = "cpu", *, dtype: torch.dtype | None = None, trainable=False
) -> nn.Module:
    """A model from a checkpoint directory, on `device`. Adapters load onto their base (trainable when asked); a
    sharded checkpoint is gathered into one model."""
    with local_directory(source) as directory:
        found = layout.local_kind(directory)
        if found == "ours":
            model = layout.load_model(directory, device)
            return model.to(dtype) if dtype is not None else model
        if found == "hf":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32)
            return model.to(device)
        if found == "sharded":
            return _load_sharded(directory, dtype).to(device)
        from peft import PeftModel

        base = load(json.loads((Path(directory) / layout.BASE_FILE).read_text())["base"], device, dtype=dtype)
        return PeftModel.from_pretrained(base, directory, is_trainable=trainable).to(device)


def skeleton(directory: str | Path) -> nn.Module:
    """The model a checkpoint directory describes, randomly initialised (with its LoRA adapters when the directory
    names them): what sharded (FSDP) weights load into."""
    directory = Path(directory)
    if (directory / layout.CONFIG_FILE).is_file():
        from ray_dpo.core.model import TransformerLM

        return TransformerLM(layout.load_model_config(directory))
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    if (directory / layout.ADAPTER_CONFIG_FILE).is_file():
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig.from_pretrained(str(directory)))
    return model


def _load_sharded(directory: str, dtype: torch.dtype | None) -> nn.Module:
    """An FSDP checkpoint's model in one process: torch.distributed.checkpoint reads every rank's shard into the
    skeleton's full tensors (no process group needed). Its metadata is a pickle: read only checkpoints you wrote."""
    import torch.distributed.checkpoint as dcp

    model = skeleton(directory)
    # the trainer shards the module it scores with (`LogpsModel`): its state keys carry that module's `model.` prefix
    state = {"model": {f"model.{k}": v for k, v in model.state_dict().items()}}
    dcp.load(state, checkpoint_id=directory)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state["model"].items()})
    return model.to(dtype) if dtype is not None else model


def merged(model: nn.Module) -> nn.Module:
    """LoRA adapters merged into their base (one plain model, faster to run); any other model as it is."""
    return model.merge_and_unload() if is_peft(model) else model


def load_for_inference(source: str | Checkpoint, device: str | torch.device = "cpu", dtype=None) -> nn.Module:
    """A model to generate or score with: loaded, LoRA merged, eval mode, no gradients."""
    return merged(load(source, device, dtype=dtype)).eval().requires_grad_(False)


def policy_and_reference(
    policy: str | Checkpoint, reference: str | Checkpoint, device: str | torch.device = "cpu", dtype=None
) -> tuple[dict[str, nn.Module], dict[str, Callable[[], contextlib.AbstractContextManager]]]:
    """The two models evaluation runs, in eval mode (in `dtype`: both are frozen here), and the context each must
    run in. LoRA adapters on the reference itself are held as ONE model: the policy with its adapters on, the
    reference with them off (no second copy of the base); other policies come merged, beside their own reference."""
    model = load(policy, device, dtype=dtype)
    if is_peft(model) and _adapter_base(policy) == storage.checkpoint_uri(storage.as_checkpoint(reference)):
        shared = peft_base(model).eval().requires_grad_(False)  # LoRA layers in place: runs like the plain model
        contexts = {"policy": contextlib.nullcontext, "reference": model.disable_adapter}
        return {"policy": shared, "reference": shared}, contexts
    held = {"policy": merged(model), "reference": load(reference, device, dtype=dtype)}
    return {k: m.eval().requires_grad_(False) for k, m in held.items()}, dict.fromkeys(held, contextlib.nullcontext)


def _adapter_base(source: str | Checkpoint) -> str:
    with local_directory(source) as directory:
        return json.loads((Path(directory) / layout.BASE_FILE).read_text())["base"]


def load_encoding(source: str | Checkpoint, fallback: Encoding | None = None) -> Encoding:
    """The encoding a checkpoint was trained with (`encoding.json` + its tokenizer); `fallback` when it has none."""
    with local_directory(source) as directory:
        if Encoding.saved_in(directory):
            return Encoding.load(directory)
    if fallback is None:
        raise ValueError(f"{source}: the checkpoint holds no {ENCODING_FILE}")
    return fallback


def save(directory: str | Path, model: nn.Module, *, encoding: Encoding | None = None, base: str | None = None):
    """Weights (safetensors) and config into `directory`: ours, a Hugging Face directory, or adapters + `base.json`
    (`base`: where the base model is staged); the encoding and its tokenizer beside them when given."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if is_peft(model):
        if base is None:
            raise ValueError("saving LoRA adapters needs the location of their base model")
        model.save_pretrained(str(directory), safe_serialization=True)
        (directory / layout.BASE_FILE).write_text(json.dumps({"base": base}))
    elif is_hf(model):
        model.save_pretrained(str(directory), safe_serialization=True)
    else:
        layout.save_model(directory, model)
    if encoding is not None:
        encoding.save(directory)
    return directory


def save_adapters(directory: str | Path, model: nn.Module, adapters: dict[str, torch.Tensor], *, base: str) -> None:
    """LoRA adapters given as whole tensors (gathered from shards), saved as PEFT saves them: `adapter_config.json`,
    `adapter_model.safetensors` and `base.json` naming their base."""
    from safetensors.torch import save_file

    directory = Path(directory)
    model.peft_config["default"].save_pretrained(str(directory))
    save_file(
        {name.replace(".default", ""): t.contiguous() for name, t in adapters.items()},
        directory / "adapter_model.safetensors",
    )
    (directory / layout.BASE_FILE).write_text(json.dumps({"base": base}))


def save_config(directory: str | Path, model: nn.Module) -> None:
    """The architecture alone (what `skeleton` rebuilds: with LoRA, the adapters' config too), for sharded
    checkpoints."""
    inner = peft_base(model)
    if is_hf(inner):
        inner.config.save_pretrained(str(directory))
    else:
        layout.save_model_config(directory, inner.config)
    if is_peft(model):
        model.peft_config["default"].save_pretrained(str(directory))


def add_lora(model: nn.Module, *, r: int, alpha: float, dropout: float, target_modules: list[str] | str, seed: int):
    """PEFT LoRA adapters on `model` (only they train); raises ValueError when `target_modules` match nothing."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # identical adapter init on every rank
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
    return get_peft_model(model, config)


def lora_targets_match(model: nn.Module, target_modules: list[str] | str) -> bool:
    if target_modules == "all-linear":
        return any(isinstance(m, nn.Linear) for m in model.modules())
    names = [target_modules] if isinstance(target_modules, str) else target_modules
    return any(name.rsplit(".", 1)[-1] in names or name in names for name, _ in model.named_modules())


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward, for both model kinds."""
    inner = peft_base(model)
    if is_hf(inner):
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if is_peft(model):
            model.enable_input_require_grads()  # LoRA: frozen embeddings would cut the graph at the first block
    else:
        inner.gradient_checkpointing = True


def max_positions(model: nn.Module) -> int:
    """The longest sequence the model was built for."""
    config = peft_base(model).config
    return getattr(config, "max_seq_len", None) or getattr(config, "max_position_embeddings", None) or 2048


def describe(model: nn.Module) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable": trainable, "class": type(model).__name__}
