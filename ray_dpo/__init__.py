"""ray-dpo: Direct Preference Optimization on Ray."""

from ray_dpo.dpo import DPO, dpo_loss, sequence_logps, token_logps
from ray_dpo.model import KVCache, ModelConfig, TransformerLM
from ray_dpo.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "DPO",
    "ByteTokenizer",
    "HFTokenizer",
    "KVCache",
    "ModelConfig",
    "TransformerLM",
    "dpo_loss",
    "load_tokenizer",
    "sequence_logps",
    "token_logps",
]
