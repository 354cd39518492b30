"""How text becomes token rows: the one encoding contract of every stage (data, SFT, evaluation, the served model).

    encoding = Encoding(tokenizer, max_len=512, max_prompt_len=256, chat_template=False)  # once, from the config
    encoding.save(checkpoint_dir); Encoding.load(checkpoint_dir)                          # with every checkpoint

    prompt    [bos] + prompt tokens          (text; pre-tokenized prompts are taken as they are)
    response  response tokens + [eos]        (text and pre-tokenized alike)
    chat      with `chat_template`, string prompts are the user turn (the assistant's turn opened), responses the
              assistant turn up to and including the template's end of turn

Truncation keeps the END of a prompt (the latest turns of a dialogue) and always its first `head` tokens (bos), then
cuts responses to the room left: TRL's `keep_end`. A response that was cut loses its eos: it did not end there.

Everything here is vectorised over a batch of rows held as flat arrays (`Ragged`: values + row offsets), so the
data stage encodes millions of rows without a Python loop; a single prompt (`encode_prompt`, what evaluation and
serving use) is the same code on a batch of one. No torch, no Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_dpo.core.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

TOKEN_TYPE = pa.int32()  # every vocabulary we meet fits; half the memory of int64 rows


@dataclass
class Ragged:
    """Rows of tokens as one flat array: row i is `values[offsets[i]:offsets[i + 1]]`."""

    values: np.ndarray  # int64
    offsets: np.ndarray  # int64, len = rows + 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_lengths(cls, values: np.ndarray, lengths: np.ndarray) -> Ragged:
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(values, offsets)

    @classmethod
    def from_rows(cls, rows: list) -> Ragged:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        values = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]) if len(rows) else np.zeros(0, np.int64)
        return cls.from_lengths(values.astype(np.int64, copy=False), lengths)

    def to_arrow(self) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(self.offsets.astype(np.int32)), pa.array(self.values, TOKEN_TYPE))

    def rows(self) -> list[np.ndarray]:
        return [self.values[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True)]


def segment_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat indices of the concatenated segments [starts[i], starts[i] + lengths[i])."""
    total = int(lengths.sum())
    out_starts = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(starts - out_starts, lengths)


def segment_sums(x: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-row sums of a flat array given row offsets (empty rows sum to 0)."""
    cum = np.zeros(len(x) + 1, dtype=x.dtype)
    np.cumsum(x, out=cum[1:])
    return cum[offsets[1:]] - cum[offsets[:-1]]


def _gather(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Ragged:
    """Rows built from per-row segments: parts[k] = (source values, start per row, length per row), in row order."""
    sources = [np.asarray(src, dtype=np.int64) for src, _, _ in parts]
    bases = np.cumsum([0, *map(len, sources)])[:-1]
    starts = np.stack([start + base for (_, start, _), base in zip(parts, bases, strict=True)], axis=1).ravel()
    lengths = np.stack([length for _, _, length in parts], axis=1).ravel()
    values = np.concatenate(sources)[segment_index(starts, lengths)]
    return Ragged.from_lengths(values, np.sum([length for _, _, length in parts], axis=0))


# ------------------------------------------------------------------------------------------------ text -> tokens


def tokenize(column: pa.Array | pa.ChunkedArray, tokenizer) -> Ragged:
    """Token ids of a string or `list<int>` column, no specials added; null rows give empty rows."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        return Ragged.from_lengths(arr.flatten().to_numpy(zero_copy_only=False).astype(np.int64), lengths)
    if isinstance(tokenizer, ByteTokenizer):
        # Byte-level ids ARE the UTF-8 bytes Arrow already holds: read its buffers, no Python per row.
        arr = arr.cast(pa.large_string())
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
        data = arr.buffers()[2]
        raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
        lengths = np.diff(offsets)
        if arr.null_count:
            lengths = np.where(arr.is_null().to_numpy(zero_copy_only=False), 0, lengths)
        return Ragged.from_lengths(raw[segment_index(offsets[:-1], lengths)].astype(np.int64), lengths)
    return Ragged.from_rows(tokenizer.encode_batch(pc.fill_null(arr, "").to_pylist()))


def is_text(column_type: pa.DataType) -> bool:
    return not (pa.types.is_list(column_type) or pa.types.is_large_list(column_type))


def prompt_head(column_type: pa.DataType, tokenizer) -> int:
    """Leading tokens every encoded prompt of this column type starts with, kept by truncation: the bos of text
    prompts (when the tokenizer has one)."""
    return int(is_text(column_type) and tokenizer.bos_id is not None)


def encode_prompts(column: pa.Array | pa.ChunkedArray, tokenizer) -> Ragged:
    """[bos] + tokens for text prompts; pre-tokenized prompts as they are (your tokenizer chose their specials)."""
    tokens = tokenize(column, tokenizer)
    if not prompt_head(column.type, tokenizer):
        return tokens
    n = len(tokens.lengths)
    bos = (np.array([tokenizer.bos_id]), np.zeros(n, np.int64), np.ones(n, np.int64))
    return _gather([bos, (tokens.values, tokens.offsets[:-1], tokens.lengths)])


def encode_responses(column: pa.Array | pa.ChunkedArray, tokenizer) -> Ragged:
    """tokens + [eos], for text and pre-tokenized responses alike: both input kinds end responses the same way."""
    tokens = tokenize(column, tokenizer)
    n = len(tokens.lengths)
    eos = (np.array([tokenizer.eos_id]), np.zeros(n, np.int64), np.ones(n, np.int64))
    return _gather([(tokens.values, tokens.offsets[:-1], tokens.lengths), eos])


# ------------------------------------------------------------------------------------------------ truncation


def fit_lengths(
    prompt_len: np.ndarray, response_lens: list[np.ndarray], *, max_len: int, max_prompt_len: int, head: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Kept lengths under TRL's keep_end rule: a row whose prompt + longest response exceeds `max_len` keeps at
    most `max_prompt_len` prompt tokens (its `head` and its end), then each response is cut to the room left.
    A kept response length of 0 means the row cannot fit."""
    longest = np.max(response_lens, axis=0) if response_lens else np.zeros_like(prompt_len)
    too_long = prompt_len + longest > max_len
    kept_prompt = np.where(too_long, np.minimum(prompt_len, max(max_prompt_len, head)), prompt_len)
    room = np.maximum(max_len - kept_prompt, 0)
    return kept_prompt, [np.minimum(lengths, room) for lengths in response_lens]


def keep_prompt_end(prompts: Ragged, keep: np.ndarray, head: int | np.ndarray) -> Ragged:
    """Each prompt cut to `keep` tokens: its first `head` tokens, then its last `keep - head`."""
    keep = np.minimum(keep, prompts.lengths)
    head = np.minimum(head, keep)
    return _gather(
        [
            (prompts.values, prompts.offsets[:-1], head),
            (prompts.values, prompts.offsets[1:] - (keep - head), keep - head),
        ]
    )


def keep_start(rows: Ragged, keep: np.ndarray) -> Ragged:
    """Each row cut to its first `keep` tokens."""
    return _gather([(rows.values, rows.offsets[:-1], np.minimum(keep, rows.lengths))])


def fit_prompt_rows(prompts: list, max_tokens: int, bos_id: int | None, head: int = 0) -> list[np.ndarray]:
    """Already-encoded prompts cut to `max_tokens` (the room generation leaves), keeping the end and the first `head`
    tokens (a chat template's opening), or a leading bos."""
    rows = Ragged.from_rows(prompts)
    nonempty = rows.lengths > 0
    head = np.full(len(nonempty), head, dtype=np.int64)
    head[nonempty] = np.maximum(head[nonempty], rows.values[rows.offsets[:-1][nonempty]] == bos_id)
    return keep_prompt_end(rows, np.minimum(rows.lengths, max(max_tokens, 1)), head).rows()


# ------------------------------------------------------------------------------------------------ chat templates


def messages(value: str | list, role: str) -> list[dict[str, str]]:
    """A turn as chat messages: a string is one message of `role`; a list of {role, content} is taken as it is."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": m["role"], "content": m["content"]} for m in value]


def chat_head(tokenizer) -> int:
    """Tokens every prompt rendered with the chat template starts with (bos, a default system turn, the user turn's
    opening): kept when a long prompt loses its middle, so the template's structure stays valid."""
    head = getattr(tokenizer, "_chat_head", None)
    if head is None:
        a, b = (tokenizer.apply_chat_template(messages(x, "user"), add_generation_prompt=True) for x in ("a", "b"))
        head = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        tokenizer._chat_head = head
    return head


def encode_chat(prompts: list, responses: list[list], tokenizer) -> tuple[Ragged, list[Ragged], int]:
    """Render with the tokenizer's chat template. prompt = the conversation so far with the generation prompt (the
    assistant's turn opened); response = what rendering the conversation with that reply adds after it, up to and
    including the first eos (the template's end of turn: no eos added twice, nothing after it). None rows give empty
    rows (flagged by the caller). Returns (prompts, responses, head)."""
    eos = tokenizer.eos_id
    prompt_rows, response_rows = [], [[] for _ in responses]
    for i, prompt in enumerate(prompts):
        turns = messages(prompt, "user") if prompt is not None else None
        rendered = tokenizer.apply_chat_template(turns, add_generation_prompt=True) if turns else []
        prompt_rows.append(rendered)
        for rows, column in zip(response_rows, responses, strict=True):
            if turns is None or column[i] is None:
                rows.append([])
                continue
            full = tokenizer.apply_chat_template(turns + messages(column[i], "assistant"), add_generation_prompt=False)
            if full[: len(rendered)] != rendered:
                raise ValueError("the chat template renders a reply without repeating the prompt's tokens first")
            reply = full[len(rendered) :]
            reply = reply[: reply.index(eos) + 1] if eos in reply else [*reply, eos]
            rows.append(reply)
    return Ragged.from_rows(prompt_rows), [Ragged.from_rows(r) for r in response_rows], chat_head(tokenizer)


# ------------------------------------------------------------------------------------------------ the spec


ENCODING_FILE = "encoding.json"  # beside the tokenizer files of every checkpoint


@dataclass(frozen=True)
class Encoding:
    """The tokenizer and the rules every stage encodes with: built once from the config (`data.*`), saved with
    every checkpoint, so evaluation of a checkpoint and the served model encode exactly as training did."""

    tokenizer: Any  # a `ray_dpo.core.tokenizer.Tokenizer`
    max_len: int = 512  # prompt + response tokens
    max_prompt_len: int = 256  # prompt tokens kept (its head and its end) when a row must be cut
    chat_template: bool = False  # render string prompts / responses with the tokenizer's chat template
    truncation: Literal["keep_end"] = "keep_end"  # prompts keep their end (TRL's keep_end), responses their start

    def __post_init__(self) -> None:
        if not 1 <= self.max_prompt_len <= self.max_len:
            raise ValueError(
                f"need 1 <= max_prompt_len <= max_len, got max_prompt_len={self.max_prompt_len}, max_len={self.max_len}"
            )
        if self.truncation != "keep_end":
            raise ValueError(f"truncation must be 'keep_end', got {self.truncation!r}")
        if self.chat_template and not getattr(self.tokenizer, "has_chat_template", False):
            raise ValueError("chat_template=True but the tokenizer has no chat template")

    def prompt_head(self) -> int:
        """Leading tokens of every encoded text prompt that a cut keeps: the chat template's opening, or bos."""
        if self.chat_template:
            return chat_head(self.tokenizer)
        return int(self.tokenizer.bos_id is not None)

    def prompt(self, text: str | list, room: int) -> list[int]:
        """One prompt (a string, or chat messages) as the model saw prompts in training, cut to leave `room` tokens
        for generation within `max_positions`: what evaluation and serving feed the model."""
        if self.chat_template or not isinstance(text, str):
            tokens = [self.tokenizer.apply_chat_template(messages(text, "user"), add_generation_prompt=True)]
        else:
            tokens = encode_prompts(pa.array([text], pa.string()), self.tokenizer).rows()
        return self.fit_prompts(tokens, room)[0].tolist()

    def fit_prompts(self, prompts: list, max_tokens: int) -> list[np.ndarray]:
        """Already-encoded prompts cut to `max_tokens` (the room generation leaves): their head (bos, the chat
        template's opening) and their end kept."""
        return fit_prompt_rows(prompts, max_tokens, self.tokenizer.bos_id, head=self.prompt_head())

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("max_len", "max_prompt_len", "chat_template", "truncation")}

    def save(self, directory: str | Path) -> Path:
        """`encoding.json` and the tokenizer's files into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(directory)
        path = directory / ENCODING_FILE
        path.write_text(json.dumps(self.to_json(), indent=2))
        return path

    @classmethod
    def load(cls, directory: str | Path, tokenizer: Tokenizer | None = None) -> Encoding:
        """The encoding saved in a checkpoint directory (its tokenizer, unless one is given)."""
        directory = Path(directory)
        values = json.loads((directory / ENCODING_FILE).read_text())
        return cls(tokenizer if tokenizer is not None else load_tokenizer(directory), **values)

    @staticmethod
    def saved_in(directory: str | Path) -> bool:
        return (Path(directory) / ENCODING_FILE).is_file()
