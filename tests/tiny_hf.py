"""A tiny Hugging Face causal LM and its tokenizer, built offline: random weights from a config, a real byte-level
BPE tokenizer trained with `tokenizers` on the repository's HH-RLHF text, a chat template. For trying the
"align your own model" path without downloading anything, and for the tests.

    python tests/tiny_hf.py outputs/hf-tiny [--arch qwen2|llama] [--vocab 600]

Needs `pip install -e ".[hf]"`. The result loads with `AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)`, like any model directory from the Hub.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO_DATA = Path(__file__).resolve().parents[1] / "data" / "hh_rlhf" / "hh_rlhf_harmless_train_1812.parquet"
# ChatML (Qwen's format): each turn <|im_start|>role\ncontent<|im_end|>\n, the generation prompt opens the
# assistant's turn; the assistant's <|im_end|> is the eos. The llama variant starts with the bos token.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = {"qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "llama": ["<s>", "</s>", "<pad>"]}


def train_tokenizer(texts: list[str], vocab_size: int, arch: str):
    """A byte-level BPE `PreTrainedTokenizerFast` with the architecture's special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[arch] + (["<|im_start|>", "<|im_end|>"] if arch == "llama" else [])
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    if arch == "qwen2":  # no bos; pad is <|endoftext|>; eos is the end of a chat turn
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        tokenizer.chat_template = CHATML
    else:  # llama: bos <s> in front of every sequence, eos </s>, a pad token of its own
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=bpe, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>"
        )
        tokenizer.chat_template = "{{ bos_token }}" + CHATML
    return tokenizer


def build(
    out_dir: str | Path, *, arch: str = "qwen2", vocab_size: int = 600, seed: int = 0, texts: list[str] | None = None
):
    """Write a tiny random `arch` model (2 layers, hidden 64) and its tokenizer to `out_dir`; returns the path."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if texts is None:
        table = pq.read_table(REPO_DATA)
        texts = [t for column in ("prompt", "chosen", "rejected") for t in table[column].to_pylist()]
    tokenizer = train_tokenizer(texts, vocab_size, arch)
    size = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if arch == "qwen2":
        config = Qwen2Config(
            vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=True, **size, **ids
        )
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer), max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id, **size, **ids
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=sorted(SPECIALS), default="qwen2")
    parser.add_argument("--vocab", type=int, default=600)
    args = parser.parse_args()
    print(build(args.out_dir, arch=args.arch, vocab_size=args.vocab))


if __name__ == "__main__":
    main()
