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
    bos_id: int
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


def load_tokenizer(spec: str | Path) -> ByteTokenizer | HFTokenizer:
    """`"byte"`, a `tokenizer.json` (ours or a Hugging Face one), or a directory holding one."""
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec)
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
