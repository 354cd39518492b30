"""ray-dpo: Direct Preference Optimization on Ray.

The torch API (x-transformers' contract) is importable from here; it needs only torch and einops:

    from ray_dpo import DPO, ModelConfig, TransformerLM, generate

Layers, inner never importing outer: `ray_dpo.core` (torch only), `ray_dpo.stages` (Ray stages, MLflow),
`ray_dpo.recipe` (the run lifecycle and the stage graph every pipeline composes).
"""

from ray_dpo.core.compat import AutoregressiveWrapper
from ray_dpo.core.dpo import DPO, sequence_logps, token_logps
from ray_dpo.core.losses import dpo_loss
from ray_dpo.core.model import KVCache, ModelConfig, TransformerLM
from ray_dpo.core.sampling import beam_search, generate
from ray_dpo.core.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "DPO",
    "AutoregressiveWrapper",
    "ByteTokenizer",
    "HFTokenizer",
    "KVCache",
    "ModelConfig",
    "TransformerLM",
    "beam_search",
    "dpo_loss",
    "generate",
    "load_tokenizer",
    "sequence_logps",
    "token_logps",
]
