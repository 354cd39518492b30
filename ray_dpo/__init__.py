"""ray-dpo: Direct Preference Optimization on Ray.

The torch API (x-transformers' contract) is importable from here; it needs only torch and einops:

    from ray_dpo import DPO, ModelConfig, TransformerLM, generate

Layers, inner never importing outer: `ray_dpo.core` (torch only), `ray_dpo.stages` (Ray stages, MLflow),
`ray_dpo.recipe` (the run lifecycle and the stage graph every pipeline composes). The names below are imported on
first use, so `import ray_dpo.config` stays free of torch.
"""

import importlib

_EXPORTS = {
    "AutoregressiveWrapper": "ray_dpo.core.compat",
    "DPO": "ray_dpo.core.dpo",
    "sequence_logps": "ray_dpo.core.dpo",
    "token_logps": "ray_dpo.core.dpo",
    "LossSpec": "ray_dpo.core.losses",
    "PairLogps": "ray_dpo.core.losses",
    "preference_loss": "ray_dpo.core.losses",
    "KVCache": "ray_dpo.core.model",
    "ModelConfig": "ray_dpo.core.model",
    "TransformerLM": "ray_dpo.core.model",
    "beam_search": "ray_dpo.core.sampling",
    "generate": "ray_dpo.core.sampling",
    "ByteTokenizer": "ray_dpo.core.tokenizer",
    "HFTokenizer": "ray_dpo.core.tokenizer",
    "load_tokenizer": "ray_dpo.core.tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ray_dpo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
