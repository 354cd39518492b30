"""Tokenizers: a lossless byte-level default (no files, no downloads) and a Hugging Face `tokenizers` JSON adapter.

Both expose the same small surface: `encode(text) -> list[int]`, `encode_batch(texts)`, `decode(ids)`,
`pad_id`, `bos_id`, `eos_id`, `vocab_size`, and `save(directory)` writing `tokenizer.json`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(Protocol):
    pad_id: int
    bos_id: int | None  # None: the tokenizer has no bos (prompts start without one)
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def save(self, directory: str | Path) -> Path: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255, then pad=256, bos=257, eos=258. Lossless for any string."""

    pad_id, bos_id, eos_id, vocab_size = 256, 257, 258, 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.write_text(json.dumps({"type": "byte"}))
        return path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (pip install 'ray-dpo[hf]'). Special tokens are looked up by name."""

    def __init__(self, path: str | Path, *, pad: str = "<pad>", bos: str = "<s>", eos: str = "</s>"):
        from tokenizers import Tokenizer as _Tokenizer

        self.path = Path(path)
        self._tok = _Tokenizer.from_file(str(self.path))
        self._tok.no_padding()
        self._tok.no_truncation()
        ids = {name: self._tok.token_to_id(tok) for name, tok in (("pad", pad), ("bos", bos), ("eos", eos))}
        missing = [f"{name}={tok!r}" for (name, tok) in (("pad", pad), ("bos", bos), ("eos", eos)) if ids[name] is None]
        if missing:
            raise ValueError(f"{self.path}: special tokens not in vocabulary: {', '.join(missing)}")
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        self._tok.save(str(path))
        return path


class PretrainedTokenizer:
    """A Hugging Face `transformers` tokenizer directory (`AutoTokenizer`): a model's own, with its chat template.

    `bos_id` is None for tokenizers without one (Qwen); pad falls back to eos when there is no pad token (as TRL
    does). Ids are encoded without the tokenizer's own specials: the encoding contract adds them.
    """

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        self.path = str(path)
        self.hf = AutoTokenizer.from_pretrained(self.path)
        if self.hf.eos_token_id is None:
            raise ValueError(f"{self.path}: the tokenizer has no eos token (responses could never end)")
        self.bos_id, self.eos_id = self.hf.bos_token_id, self.hf.eos_token_id
        self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def _identity(self) -> tuple:
        return (self.bos_id, self.eos_id, self.pad_id, self.vocab_size, self.hf.chat_template, self.hf.get_vocab())

    def __eq__(self, other: object) -> bool:  # the same tokens, specials and template, wherever it was loaded from
        return isinstance(other, PretrainedTokenizer) and self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash((self.bos_id, self.eos_id, self.pad_id, self.vocab_size))

    def encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        ids = self.hf(list(texts), add_special_tokens=False)["input_ids"] if len(texts) else []
        return [np.asarray(row, dtype=np.int64) for row in ids]

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
        out = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | Path) -> Path:
        self.hf.save_pretrained(str(directory))
        return Path(directory) / TOKENIZER_FILE


def load_tokenizer(spec: str | Path) -> ByteTokenizer | HFTokenizer | PretrainedTokenizer:
    """`"byte"`, a `tokenizer.json` (ours or a Hugging Face one), a Hugging Face tokenizer directory (with its
    `tokenizer_config.json`: chat template, special tokens), or a directory holding a `tokenizer.json`."""
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir() and (path / "tokenizer_config.json").is_file():
        return PretrainedTokenizer(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer: no such file {path} (use 'byte' or a tokenizer.json path)")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"tokenizer: {path} is not valid JSON ({err})") from None
    if content.get("type") == "byte":
        return ByteTokenizer()
    return HFTokenizer(path)
