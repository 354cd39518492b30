"""The read engine: Parquet rows -> tokenized, truncated, validated and accounted Ray Dataset.

- `read_preferences(paths, *, encoding, columns, on_bad_row)` -> (materialized Dataset, DataStats)
- `read_sft(paths, *, encoding, prompt_column, response_column, on_bad_row)` -> the same for (prompt, response) rows
- `read_prompts(paths, *, encoding, column)` -> prompts alone (evaluation of a file of prompts)

`encoding` (`ray_dpo.core.encoding.Encoding`: tokenizer, max lengths, chat template, truncation) is the run's one
encoding spec. Output rows: `prompt`, `chosen`, `rejected` (or `response`) as list<int32>, the prompt stored
once (docs/ARCHITECTURE.md). A row is dropped as `too_long` when no response token fits, and as
`identical_after_truncation` when the cut made chosen and rejected equal (such a pair carries no preference signal).

Bad rows (`on_bad_row`): null value, empty / whitespace-only response (or an empty token list), a token id
outside the vocabulary (pre-tokenized input), chosen == rejected, and the two truncation reasons above.
"error" stops with ONE line naming file, column, row index within the file and what is wrong; "skip" drops
the row and counts it by reason in `DataStats.dropped`. File-level problems (no files, unreadable file,
missing column, wrong column type, zero rows) are errors in both modes: they are not bad rows.

How it runs: ONE pass over the data. The driver reads the footers (schema, row groups), cuts the files into pieces
of about `_PIECE_BYTES` of text (at least two per CPU, so the last wave is balanced) and runs one Ray task per
piece: decode its row groups batch by batch, encode, validate, truncate, drop bad rows, return the int32 block and
a small summary (rows per status, the first bad row). A row group larger than a piece is decoded once, by a task
that hands each piece to an encoding task as soon as it is decoded (a Ray generator), so no task decodes rows it
does not keep and encoding overlaps decoding. The blocks become a materialized Dataset in file order
(`ray.data.from_arrow_refs`); the row accounting is the sum of the summaries, so nothing reads the data a second
time. Plain tasks rather than a Ray Data read + map_batches: a Ray Data execution costs ~0.1-1 s of fixed
scheduling, reads a file in one task, and could not count rows by reason without a second pass over its output.

Why tasks report bad rows instead of raising: an exception inside a Ray task prints Ray's error logs before our
one line. Each task knows where its piece starts in its file, so its summary carries the first bad row's index
(or the first row it could not decode) and the driver raises the one-line DataError, naming the first in file
order.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from ray_dpo.core.encoding import (
    Encoding,
    Ragged,
    encode_chat,
    encode_prompts,
    encode_responses,
    fit_lengths,
    is_text,
    keep_prompt_end,
    keep_start,
    prompt_head,
    segment_index,
    segment_sums,
)
from ray_dpo.errors import UserError

PAIR_FIELDS = ("prompt", "chosen", "rejected")
SFT_FIELDS = ("prompt", "response")
# Drop reasons, in the order they are checked (a row is counted under its first reason).
REASONS = ("null", "empty", "bad_token", "identical", "too_long", "identical_after_truncation")
_OK, _TRUNCATED = 0, 1  # status codes; reason i has code 2 + i
_STATUS = "_status"
_MAP_BATCH_SIZE = 2048  # rows per vectorised call: amortises per-call overhead, small enough to stay in cache
_PIECE_BYTES = 32 << 20  # text per task: its int32 token block (~4x) stays under Ray Data's 128 MiB block size
_MIN_PIECE_ROWS = 4096  # below this a task's fixed cost (a few ms of scheduling and object store) rivals its work


class DataError(UserError):
    """Bad input data; the message is one line naming the file, column, row and the problem."""


@dataclass
class DataStats:
    """Row accounting: `rows_in == rows_out + sum(dropped.values())`."""

    rows_in: int
    rows_out: int
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    truncated: int = 0
    digest: str = ""  # of the files read (paths, sizes, row counts): changes when the data does

    def as_dict(self) -> dict[str, int]:
        """Flat metrics for MLflow: `data/rows_in`, `data/rows_out`, `data/truncated`, `data/dropped/<reason>`."""
        out = {"data/rows_in": self.rows_in, "data/rows_out": self.rows_out, "data/truncated": self.truncated}
        out.update({f"data/dropped/{reason}": count for reason, count in self.dropped.items()})
        return out


# ----------------------------------------------------------------------------------------------------------
# Files: resolve paths, read footers (schema, row counts) on the driver before any Ray work.


@dataclass
class _Plan:
    filesystem: pafs.FileSystem
    files: list[str]
    rows: list[int]
    names: dict[str, str]  # our field -> file column, in field order (prompt first)
    kinds: dict[str, str]  # our field -> "text" | "ids" | "messages"
    groups: list[list[tuple[int, int]]]  # per file, per row group: (rows, uncompressed bytes of our columns)
    digest: str = ""


def _split_uri(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except Exception as err:  # unsupported scheme, missing credentials...
            raise DataError(f"{path}: cannot open filesystem ({_first_line(err)})") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _is_data_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return not name.startswith(("_", ".")) and name.endswith((".parquet", ".parq", ".pq"))


def _resolve_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[pafs.FileSystem, list[str]]:
    """A file, a directory (recursive, *.parquet), a glob, or a list of these; one filesystem for all."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise DataError("read_preferences: no paths given")
    filesystem, files = None, []
    for item in map(os.fspath, items):
        fs, path = _split_uri(item)
        if filesystem is not None and fs.type_name != filesystem.type_name:
            raise DataError(f"{item}: all paths must be on one filesystem ({filesystem.type_name} vs {fs.type_name})")
        filesystem = fs
        if any(ch in path for ch in "*?["):
            parts = path.split("/")
            first_glob = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
            base = "/".join(parts[:first_glob]) or "/"
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            matched = sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path))
            if not matched:
                raise DataError(f"{item}: glob matched no files")
            files.extend(matched)
            continue
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            files.append(path)
        elif info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            found = sorted(i.path for i in infos if i.type == pafs.FileType.File and _is_data_file(i.path))
            if not found:
                raise DataError(f"{item}: directory holds no .parquet files")
            files.extend(found)
        else:
            raise DataError(f"{item}: no such file or directory")
    return filesystem, list(dict.fromkeys(files))  # dedupe, keep order


def _column_kind(dtype: pa.DataType) -> str | None:
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return "text"
    if (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)) and pa.types.is_integer(dtype.value_type):
        return "ids"
    if _is_messages(dtype) and {"role", "content"} <= {f.name for f in dtype.value_type}:
        return "messages"
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _plan(paths, names: dict[str, str], hint: str) -> _Plan:
    filesystem, files = _resolve_files(paths)

    def footer(path: str) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(filesystem.open_input_file(path))
        except Exception as err:
            raise DataError(f"{path}: unreadable Parquet file ({_first_line(err)})") from None

    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:  # remote stores: fetch footers in parallel
        footers = list(pool.map(footer, files))
    kinds: dict[str, str] = {}
    rows, groups = [], []
    for path, pf in zip(files, footers, strict=True):
        schema = pf.schema_arrow
        for ours, theirs in names.items():
            if theirs not in schema.names:
                raise DataError(f"{path}: missing column '{theirs}'; it has {schema.names}{hint}")
            dtype = schema.field(theirs).type
            kind = _column_kind(dtype)
            if kind is None:
                raise DataError(
                    f"{path}: column '{theirs}' has type {dtype}; expected string, list<int> or "
                    "list<struct<role, content>> (chat messages)"
                )
            if kinds.setdefault(ours, kind) != kind:
                raise DataError(f"{path}: column '{theirs}' is {kind} here but {kinds[ours]} in {files[0]}")
        rows.append(pf.metadata.num_rows)
        groups.append(_row_groups(pf.metadata, set(names.values())))
    if sum(rows) == 0:
        raise DataError(f"{', '.join(files[:3])}{' ...' if len(files) > 3 else ''}: no rows to read")
    sizes = [info.size for info in filesystem.get_file_info(files)]
    digest = hashlib.sha256(json.dumps([files, sizes, rows, names]).encode()).hexdigest()
    return _Plan(filesystem, files, rows, names, kinds, groups, digest)


def _row_groups(metadata: pq.FileMetaData, columns: set[str]) -> list[tuple[int, int]]:
    """(rows, uncompressed bytes of `columns`) per row group: what a task reading it decodes."""

    def ours(path: str) -> bool:  # a leaf of one of our columns: "prompt", or "question.list.element"
        return any(path == name or path.startswith(name + ".") for name in columns)

    out = []
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        chunks = (group.column(c) for c in range(group.num_columns))
        out.append((group.num_rows, sum(c.total_uncompressed_size for c in chunks if ours(c.path_in_schema))))
    return out


# ----------------------------------------------------------------------------------------------------------
# Vectorised core: a pyarrow table of raw columns -> token rows + a status code per row. No Ray in here,
# so the driver's error path runs exactly the same checks as the tasks.


@dataclass
class _Processed:
    table: pa.Table  # output columns + _status, one row per input row (dropped rows hold empty lists)
    status: np.ndarray  # int8 per row
    bad_field: np.ndarray  # int8 per row: index into the fields of the column to blame, -1 if none


def _prefixes_equal(a: Ragged, b: Ragged, rows: np.ndarray, n: np.ndarray) -> np.ndarray:
    """For the selected rows: a[row][:n] == b[row][:n]."""
    neq = a.values[segment_index(a.offsets[:-1][rows], n)] != b.values[segment_index(b.offsets[:-1][rows], n)]
    return segment_sums(neq.astype(np.int64), Ragged.from_lengths(neq, n).offsets) == 0


def _is_messages(dtype: pa.DataType) -> bool:
    """TRL's conversational format: list<struct<role, content>>."""
    return (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)) and pa.types.is_struct(dtype.value_type)


def _process(table: pa.Table, *, names: dict[str, str], encoding: Encoding) -> _Processed:
    n = table.num_rows
    tokenizer, max_len, max_prompt_len = encoding.tokenizer, encoding.max_len, encoding.max_prompt_len
    fields = list(names)  # prompt first, then the response fields
    status = np.zeros(n, dtype=np.int8)
    bad_field = np.full(n, -1, dtype=np.int8)

    def flag(mask: np.ndarray, reason: str, field_index: int) -> None:
        fresh = mask & (status < 2)  # first reason wins
        status[fresh] = 2 + REASONS.index(reason)
        bad_field[fresh] = field_index

    columns = [table[names[f]] for f in fields]
    for i, column in enumerate(columns):
        flag(column.is_null().to_numpy(zero_copy_only=False), "null", i)
        if i and is_text(column.type) and not _is_messages(column.type):  # an empty prompt is fine: bos stands in
            blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
            flag(pc.fill_null(blank, False).to_numpy(zero_copy_only=False), "empty", i)
    if encoding.chat_template or any(_is_messages(c.type) for c in columns):  # the tokenizer's chat template
        prompt, responses, head = encode_chat(columns[0].to_pylist(), [c.to_pylist() for c in columns[1:]], tokenizer)
        for i, response in enumerate(responses, start=1):
            flag(response.lengths <= 1, "empty", i)  # nothing but the end of the turn
        encoded = dict(zip(fields, [prompt, *responses], strict=True))
    else:
        head = prompt_head(columns[0].type, tokenizer)
        encoded = {}
        for i, (f, column) in enumerate(zip(fields, columns, strict=True)):
            encoded[f] = encode_prompts(column, tokenizer) if f == "prompt" else encode_responses(column, tokenizer)
            if not is_text(column.type):
                # an empty pre-tokenized prompt would leave the first response token unscored
                flag(encoded[f].lengths == (0 if f == "prompt" else 1), "empty", i)
                bad = ((encoded[f].values < 0) | (encoded[f].values >= tokenizer.vocab_size)).astype(np.int64)
                flag(segment_sums(bad, encoded[f].offsets) > 0, "bad_token", i)

    prompt, responses = encoded["prompt"], [encoded[f] for f in fields[1:]]
    pair = len(responses) == 2
    if pair:
        same = np.flatnonzero(responses[0].lengths == responses[1].lengths)
        identical = np.zeros(n, dtype=bool)
        identical[same] = _prefixes_equal(*responses, same, responses[0].lengths[same])
        flag(identical, "identical", 1)

    prompt_len, kept = fit_lengths(
        prompt.lengths, [r.lengths for r in responses], max_len=max_len, max_prompt_len=max_prompt_len, head=head
    )
    flag(prompt_len >= max_len, "too_long", 0)  # no room for a single response token
    if pair:
        cut_same = np.flatnonzero((kept[0] == kept[1]) & (status < 2))
        identical = np.zeros(n, dtype=bool)
        identical[cut_same] = _prefixes_equal(*responses, cut_same, kept[0][cut_same])
        flag(identical, "identical_after_truncation", 1)
    truncated = prompt_len < prompt.lengths
    for response, length in zip(responses, kept, strict=True):
        truncated |= length < response.lengths
    status[(status < 2) & truncated] = _TRUNCATED

    keep = status < 2
    out = {"prompt": keep_prompt_end(prompt, np.where(keep, prompt_len, 0), head).to_arrow()}
    for f, response, length in zip(fields[1:], responses, kept, strict=True):
        out[f] = keep_start(response, np.where(keep, length, 0)).to_arrow()
    out[_STATUS] = status
    return _Processed(pa.table(out), status, bad_field)


def _describe(reason: str, field_index: int, names: dict[str, str], max_len: int, max_prompt_len: int) -> str:
    column = list(names.values())[field_index]
    pair = f"columns '{names.get('chosen')}' and '{names.get('rejected')}'"
    return {
        "null": f"column '{column}' is null",
        "empty": f"column '{column}' is empty or whitespace-only",
        "bad_token": f"column '{column}' holds a token id outside the tokenizer's vocabulary",
        "identical": f"{pair} are identical",
        "too_long": f"column '{column}' leaves no room for a response (max_len={max_len}, "
        f"max_prompt_len={max_prompt_len})",
        "identical_after_truncation": f"{pair} are identical after truncation to max_len={max_len}",
    }[reason]


_HINT = " (on_bad_row='skip' drops and counts such rows)"


@dataclass
class _Summary:
    """What a piece's task tells the driver: rows per status code, the first bad row, or why it could not read."""

    counts: np.ndarray  # int64, rows per status code (_OK, _TRUNCATED, then one per reason)
    first_bad: tuple[int, int, int] | None = None  # (row index within the file, status, field index)
    error: str | None = None  # one line: the file and the first row that could not be decoded

    @classmethod
    def failed(cls, error: str) -> _Summary:
        return cls(np.zeros(2 + len(REASONS), dtype=np.int64), error=error)


@dataclass(frozen=True)
class _Source:
    """What a task reads: some consecutive row groups of one file, in batches."""

    filesystem: pafs.FileSystem
    path: str
    row_groups: tuple[int, ...]
    columns: list[str]
    first_row: int  # of the first row group, within the file
    batch_rows: int


def _batches(source: _Source) -> Iterator[pa.Table | str]:
    """Yields the raw columns as `batch_rows`-row tables, decoded as they are needed (the encoding finds a batch in
    cache); if the data cannot be decoded, yields instead a one-line error naming the first row not decoded."""
    offset = source.first_row
    try:
        pf = pq.ParquetFile(source.filesystem.open_input_file(source.path))
        for batch in pf.iter_batches(
            batch_size=source.batch_rows, row_groups=list(source.row_groups), columns=source.columns
        ):
            yield pa.Table.from_batches([batch])
            offset += batch.num_rows
    except Exception as err:  # corrupt pages, a file changed or gone since the footers were read
        yield f"{source.path}: unreadable Parquet data after row {offset} ({_first_line(err)})"


def _encode_batches(batches: Iterable[pa.Table | str], first_row: int, core: dict) -> tuple[pa.Table, _Summary]:
    """Raw batches of one piece (starting at `first_row` of its file; a str is a read error) -> the piece's token
    rows, bad rows dropped, and its summary."""
    summary = _Summary(np.zeros(2 + len(REASONS), dtype=np.int64))
    parts, row = [], first_row
    for batch in batches:
        if isinstance(batch, str):
            return pa.table({}), _Summary.failed(batch)
        done = _process(batch, **core)
        summary.counts += np.bincount(done.status.astype(np.int64), minlength=len(summary.counts))
        out = done.table.drop_columns([_STATUS])
        bad = np.flatnonzero(done.status >= 2)
        if len(bad):
            if summary.first_bad is None:
                i = int(bad[0])
                summary.first_bad = (row + i, int(done.status[i]), int(done.bad_field[i]))
            out = out.filter(pa.array(done.status < 2))
        parts.append(out)
        row += batch.num_rows
    return (pa.concat_tables(parts) if parts else pa.table({})), summary


@ray.remote(num_returns=2, scheduling_strategy="SPREAD")
def _read_and_encode(source: _Source, core: dict) -> tuple[pa.Table, _Summary]:
    """A piece of whole row groups, read and encoded in one task (the raw text never enters the object store)."""
    return _encode_batches(_batches(source), source.first_row, core)


@ray.remote(num_returns="streaming", scheduling_strategy="SPREAD")
def _read_and_cut(source: _Source, piece_rows: int) -> Iterator[tuple[int, pa.Table] | str]:
    """A row group larger than a piece, decoded once: yields (first row, raw table) per ~`piece_rows` rows (whole
    batches) as soon as they are decoded, so `_encode` tasks run while the rest is still being decoded; a read
    error is yielded as its one-line message."""
    pending, start = [], source.first_row
    row = start
    for batch in _batches(source):
        if isinstance(batch, str):
            yield batch
            return
        pending.append(batch)
        row += batch.num_rows
        if row - start >= piece_rows:
            yield start, pa.concat_tables(pending)
            pending, start = [], row
    if pending:
        yield start, pa.concat_tables(pending)


@ray.remote(num_returns=2)
def _encode(piece: tuple[int, pa.Table] | str, core: dict) -> tuple[pa.Table, _Summary]:
    """One piece yielded by `_read_and_cut` -> its token rows and summary."""
    if isinstance(piece, str):  # the read failed: pass its message on
        return pa.table({}), _Summary.failed(piece)
    first_row, table = piece
    batches = (pa.Table.from_batches([b]) for b in table.to_batches())  # the batches _read_and_cut decoded
    return _encode_batches(batches, first_row, core)


@dataclass(frozen=True)
class _Read:
    """Consecutive row groups of one file, decoded by one task; encoded by the same task (`pieces == 1`) or, for
    one row group larger than a piece, by `pieces` tasks."""

    file: int  # index into _Plan.files
    row_groups: tuple[int, ...]
    first_row: int  # within the file
    rows: int
    pieces: int


def _reads(plan: _Plan, cpus: int) -> list[_Read]:
    """Cut the files into reads of whole row groups of at most `piece_rows` rows together, or one larger row group
    cut into pieces. Pieces: ~`_PIECE_BYTES` of text each, at least two per CPU (so the last wave of tasks is
    balanced), at least `_MIN_PIECE_ROWS` rows. In file order."""
    total_bytes = sum(size for groups in plan.groups for _, size in groups)
    wanted = max(-(-total_bytes // _PIECE_BYTES), 2 * cpus)
    piece_rows = max(-(-sum(plan.rows) // wanted), _MIN_PIECE_ROWS)
    reads = []
    for f, groups in enumerate(plan.groups):
        runs: list[list[int]] = []  # consecutive row groups that together stay within piece_rows (or one larger)
        run_rows = 0
        for g, (rows, _) in enumerate(groups):
            if not runs or run_rows + rows > piece_rows:
                runs.append([])
                run_rows = 0
            runs[-1].append(g)
            run_rows += rows
        first_row = 0
        for run in runs:
            rows = sum(groups[g][0] for g in run)
            if rows:  # row groups of zero rows need no task
                reads.append(_Read(f, tuple(run), first_row, rows, -(-rows // piece_rows)))
            first_row += rows
    return reads


def _cluster_cpus() -> int:
    """CPUs of the whole cluster: how many pieces can run at once."""
    if not ray.is_initialized():
        ray.init()  # as Ray Data does on first use
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


# ----------------------------------------------------------------------------------------------------------
# Public entry points.


def read_preferences(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    encoding: Encoding,
    columns: dict[str, str] | None = None,
    on_bad_row: str = "error",
) -> tuple[ray.data.Dataset, DataStats]:
    """Read preference pairs from Parquet into a MATERIALIZED Ray Dataset of token rows (see module doc).

    paths: a file, directory, glob or list of them; local or any URI pyarrow reads (s3://, gs://, ...).
    columns: our names -> the file's, e.g. {"prompt": "question", "chosen": "good", "rejected": "bad"}.
    on_bad_row: "error" (one-line DataError naming file, column, row) or "skip" (drop and count).
    Columns of chat messages are always rendered with the tokenizer's chat template; string columns when
    `encoding.chat_template` is on.
    Materialized: the row accounting needs the data computed once anyway, and a lazy dataset feeding a trainer
    that holds the CPUs of a small machine can starve.
    """
    unknown = set(columns or {}) - set(PAIR_FIELDS)
    if unknown:
        raise DataError(f"columns: unknown keys {sorted(unknown)}; expected some of {list(PAIR_FIELDS)}")
    names = {f: (columns or {}).get(f, f) for f in PAIR_FIELDS}
    hint = "" if columns else ' (map names with columns={"prompt": ..., "chosen": ..., "rejected": ...})'
    return _read(paths, names, hint, encoding, on_bad_row)


def read_sft(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    encoding: Encoding,
    prompt_column: str = "prompt",
    response_column: str = "response",
    on_bad_row: str = "error",
) -> tuple[ray.data.Dataset, DataStats]:
    """(prompt, response) Parquet -> rows `prompt`, `response`: the same encoding, truncation and checks as pairs."""
    names = {"prompt": prompt_column, "response": response_column}
    hint = " (set sft.prompt_column / sft.response_column)"
    return _read(paths, names, hint, encoding, on_bad_row)


def _read(paths, names, hint, encoding: Encoding, on_bad_row: str) -> tuple[ray.data.Dataset, DataStats]:
    if on_bad_row not in ("error", "skip"):
        raise UserError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    plan = _plan(paths, names, hint)
    if "messages" in plan.kinds.values() and not getattr(encoding.tokenizer, "has_chat_template", False):
        raise DataError(f"{plan.files[0]}: its columns hold chat messages, but the tokenizer has no chat template")
    # One object for every task: a large tokenizer is serialized once, not once per piece.
    core = ray.put(dict(names=names, encoding=encoding))
    columns = list(dict.fromkeys(names.values()))

    # Submit every read first (they all start), then hand each cut read's pieces to encode tasks as they come.
    submitted = []
    for read in _reads(plan, _cluster_cpus()):
        source = _Source(
            plan.filesystem, plan.files[read.file], read.row_groups, columns, read.first_row, _MAP_BATCH_SIZE
        )
        if read.pieces == 1:
            submitted.append((read, [_read_and_encode.remote(source, core)]))
        else:
            submitted.append((read, _read_and_cut.remote(source, -(-read.rows // read.pieces))))
    blocks, summaries, files = [], [], []  # one entry per piece, in file order
    for read, outputs in submitted:
        if not isinstance(outputs, list):  # a generator of raw pieces
            outputs = [_encode.remote(piece, core) for piece in outputs]
        for block, summary in outputs:
            blocks.append(block)
            summaries.append(summary)
            files.append(plan.files[read.file])
    summaries = ray.get(summaries)

    for summary in summaries:  # in file order: the first unreadable row group is the one reported
        if summary.error:
            raise DataError(summary.error)
    counts = np.sum([s.counts for s in summaries], axis=0)
    if on_bad_row == "error" and counts[2:].any():
        summary, path = next((s, f) for s, f in zip(summaries, files, strict=True) if s.first_bad)
        row, status, field_index = summary.first_bad
        what = _describe(REASONS[status - 2], field_index, names, encoding.max_len, encoding.max_prompt_len)
        raise DataError(f"{path}: row {row}: {what}{_HINT}")
    stats = DataStats(
        rows_in=sum(plan.rows),
        rows_out=int(counts[_OK] + counts[_TRUNCATED]),
        dropped={reason: int(counts[2 + i]) for i, reason in enumerate(REASONS)},
        truncated=int(counts[_TRUNCATED]),
        digest=plan.digest,
    )
    if stats.rows_in != stats.rows_out + sum(stats.dropped.values()):  # Parquet footers vs rows seen
        raise DataError(f"{plan.files[0]}: footers announce {stats.rows_in} rows but {int(counts.sum())} were read")
    if stats.rows_out == 0:
        dropped = ", ".join(f"{k}={v}" for k, v in stats.dropped.items() if v)
        raise DataError(f"{plan.files[0]}: all {stats.rows_in} rows were dropped ({dropped})")
    out = ray.data.from_arrow_refs(blocks)  # already computed: a MaterializedDataset, blocks in file order
    # Keep file order through later operations: reproducible rows for seeded splits/bucketing and for the tests.
    out.context.execution_options.preserve_order = True
    return out, stats


def read_prompts(paths: str | os.PathLike | Sequence[str | os.PathLike], *, encoding: Encoding, column: str = "prompt"):
    """A Parquet file of prompts -> rows with the `prompt` token column, encoded exactly as training prompts (uncut:
    generation cuts them to leave room for the response)."""
    names = {"prompt": column}
    plan = _plan(paths, names, " (set data.columns.prompt)")
    ds = ray.data.read_parquet(plan.files, filesystem=plan.filesystem, partitioning=None, file_extensions=None)
    ds = ds.select_columns([column])
    chat = encoding.chat_template or plan.kinds["prompt"] == "messages"

    def encode(batch: pa.Table) -> pa.Table:
        if chat:
            prompts = encode_chat(batch[column].to_pylist(), [], encoding.tokenizer)[0]
        else:
            prompts = encode_prompts(batch[column], encoding.tokenizer)
        return pa.table({"prompt": prompts.to_arrow()})

    ds = ds.map_batches(encode, batch_format="pyarrow")
    ds.context.execution_options.preserve_order = True
    return ds
