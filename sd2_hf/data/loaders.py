"""Load seed conversations and evaluation prompts into the one conversation form.

Sources: ``asset:<name>``, a JSON array file (streamed, and recovered when truncated), a JSONL
file (or a gzip-compressed ``.jsonl.gz``/``.json.gz``, as committed distilled sets are), a ``datasets`` directory saved with ``save_to_disk``, a directory of data files, or a
Parquet/Arrow file. Row forms (detected per row with ``format="auto"``):

- ``sharegpt``: ``{"conversations": [{"from": "human", "value": ...}, ...]}``
- ``messages``: ``{"messages": [{"role": "user", "content": ...}, ...]}``
- ``alpaca``: ``{"instruction": ..., "input": ..., "output": ...}``
- ``prompt``: ``{"prompt": ...}`` or ``{"text": ...}`` (a single user turn)

Malformed rows are skipped and counted by reason (`sd2_hf.data.schema.REASONS`), never raised.
"""

from __future__ import annotations

import codecs
import gzip
import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from sd2_hf.data.schema import MalformedRow, normalize_messages

logger = logging.getLogger(__name__)

RowFormat = Literal["auto", "sharegpt", "messages", "alpaca", "prompt"]
ROW_FORMATS: tuple[str, ...] = get_args(RowFormat)

_CHUNK_CHARS = 1 << 20  # bytes read per step when streaming a JSON array
_DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


@dataclass
class LoadResult:
    """Rows in the conversation form plus the accounting of everything that was not loaded.

    `total` counts the records examined; without `limit`, ``total == len(rows) +
    sum(skipped.values())``. `truncated_bytes` is the size of the incomplete record at the end
    of a truncated JSON array (0 when the file is complete or reading stopped at `limit`).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    total: int = 0
    truncated_bytes: int = 0

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        text = f"{len(self.rows)} rows loaded of {self.total} records; skipped: {reasons}"
        if self.truncated_bytes:
            text += f"; {self.truncated_bytes} bytes of an incomplete final record dropped"
        return text


def _detect_format(record: Mapping[str, Any]) -> str:
    for key, form in (
        ("conversations", "sharegpt"),
        ("messages", "messages"),
        ("instruction", "alpaca"),
        ("prompt", "prompt"),
        ("text", "prompt"),
    ):
        if key in record:
            return form
    raise MalformedRow(
        "missing_field",
        f"no known row form in keys {sorted(record)}; expected one of "
        "conversations | messages | instruction(+input, output) | prompt | text",
    )


def _require(record: Mapping[str, Any], key: str) -> Any:
    if key not in record:
        raise MalformedRow("missing_field", f"{key!r} not in {sorted(record)}")
    return record[key]


def record_to_messages(record: Any, format: str = "auto") -> list[dict[str, str]]:
    """Convert one raw record to the conversation form; raises `MalformedRow` when unusable."""
    if not isinstance(record, Mapping):
        raise MalformedRow("not_an_object", f"a record must be an object, got {type(record)}")
    form = _detect_format(record) if format == "auto" else format
    if form == "sharegpt":
        return normalize_messages(_require(record, "conversations"))
    if form == "messages":
        return normalize_messages(_require(record, "messages"))
    if form == "alpaca":
        instruction = _require(record, "instruction")
        extra, output = record.get("input") or "", record.get("output") or ""
        parts = [instruction, extra, output]
        if not all(isinstance(p, str) for p in parts):
            raise MalformedRow("non_string_content", "instruction/input/output must be strings")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        return normalize_messages(turns)
    if form == "prompt":
        text = record["prompt"] if "prompt" in record else _require(record, "text")
        return normalize_messages([{"role": "user", "content": text}])
    raise ValueError(f"unknown format {format!r}; allowed: {', '.join(ROW_FORMATS)}")


def iter_json_array(path: str | Path) -> Iterator[Any]:
    """Yield the elements of a JSON array file one by one, reading it in chunks.

    A file cut off mid-record (the shipped ShareGPT file) yields every complete element; the
    generator's return value (``StopIteration.value``) is the number of bytes of the incomplete
    tail that were dropped. Only one element plus one chunk is held in memory at a time.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    with _open(Path(path), binary=True) as f:

        def more() -> str:
            return utf8.decode(f.read(_CHUNK_CHARS))

        buf, pos, eof = more(), 0, False
        while not eof and not buf.lstrip():
            chunk = more()
            eof = not chunk
            buf += chunk
        buf = buf.lstrip()
        if not buf.startswith("["):
            raise ValueError(f"{path} is not a JSON array (starts with {buf[:20]!r})")
        pos = 1
        while True:
            # Skip separators; refill when the buffer runs dry.
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(buf) or eof:
                    break
                buf, pos = more(), 0
                eof = not buf
            if pos >= len(buf) or buf[pos] == "]":
                return 0
            try:
                element, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    tail = buf[pos:]
                    return len(tail.encode("utf-8")) + len(utf8.getstate()[0])
                chunk = more()
                eof = not chunk
                buf, pos = buf[pos:] + chunk, 0
                continue
            # A number or literal can end exactly at the chunk edge ("12" of "123"): the
            # element is only complete when something follows it.
            if end == len(buf) and not eof:
                chunk = more()
                eof = not chunk
                buf, pos = buf[pos:] + chunk, 0
                continue
            yield element
            pos = end


def _open(path: Path, binary: bool = False):
    """A handle on `path` (bytes, or text decoded as UTF-8 with replacement), decompressing a
    `.gz` file on the fly."""
    opener = gzip.open if path.suffix == ".gz" else open
    if binary:
        return opener(path, "rb")
    return opener(path, "rt", encoding="utf-8", errors="replace")


def _iter_jsonl(path: Path) -> Iterator[Any]:
    with _open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield MalformedRow("invalid_json", line[:80])


def _first_char(path: Path) -> str:
    with _open(path) as f:
        while chunk := f.read(4096):
            if stripped := chunk.lstrip():
                return stripped[0]
    return ""


def _iter_dataset(source: Path) -> Iterator[Any]:
    import datasets

    if source.is_dir() and (
        (source / "dataset_info.json").exists() or (source / "dataset_dict.json").exists()
    ):
        ds = datasets.load_from_disk(str(source))
    else:
        builder = _DATA_FILE_BUILDERS.get(source.suffix)
        try:
            ds = (
                datasets.load_dataset(builder, data_files=str(source))
                if builder
                else datasets.load_dataset(str(source))
            )
        except Exception as err:  # datasets raises many types; the user needs the cause
            raise ValueError(
                f"cannot load {source} with datasets ({type(err).__name__}: {err}); expected a "
                "save_to_disk directory, a Parquet/Arrow/CSV file, or a directory whose data "
                "files datasets.load_dataset can read (e.g. data/train-00000.jsonl)"
            ) from err
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise ValueError(
                f"{source} has splits {list(ds)}; save one split or name the file of the one to load"
            )
    yield from ds


class _Records:
    """The records of a source, plus the truncated-bytes count once a JSON array is exhausted."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.truncated_bytes = 0

    def __iter__(self) -> Iterator[Any]:
        src = self.source
        if src.is_dir() or src.suffix in _DATA_FILE_BUILDERS:
            yield from _iter_dataset(src)
        elif _first_char(src) == "[":
            self.truncated_bytes = yield from iter_json_array(src)
        else:
            yield from _iter_jsonl(src)


def load_conversations(
    source: str, format: RowFormat = "auto", limit: int | None = None
) -> LoadResult:
    """Load seed conversations from `source` into the one form, skipping and counting bad rows.

    Args:
        source: ``asset:<name>``, a JSON/JSONL/Parquet/Arrow file, or a `datasets` directory.
        format: the row form, or ``"auto"`` to detect it per row.
        limit: stop after this many good rows (the rest of the file is not read).

    Ids are the record's ``id`` (or ``question_id``) when present, else ``<file-stem>-<index>``
    with the record's position in the source; a repeated id gets ``#<n>`` for its n-th repeat
    (ShareGPT V3 has 123 ids used twice for different conversations), so ids are unique and
    the same on every run.
    """
    if format not in ROW_FORMATS:
        raise ValueError(f"unknown format {format!r}; allowed: {', '.join(ROW_FORMATS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    from sd2_hf.assets import resolve_data

    path = Path(resolve_data(source))
    if not path.exists():
        raise FileNotFoundError(
            f"dataset source {source!r} not found; expected asset:<name>, a JSON/JSONL file, "
            "or a datasets directory"
        )
    result = LoadResult()
    if limit == 0:
        return result
    records = _Records(path)
    seen: Counter[str] = Counter()
    for index, record in enumerate(records):
        result.total += 1
        try:
            if isinstance(record, MalformedRow):
                raise record
            messages = record_to_messages(record, format)
        except MalformedRow as bad:
            result.skipped[bad.reason] += 1
            continue
        raw_id = record.get("id", record.get("question_id"))
        row_id = str(raw_id) if raw_id not in (None, "") else f"{path.stem}-{index}"
        seen[row_id] += 1
        if seen[row_id] > 1:
            row_id = f"{row_id}#{seen[row_id] - 1}"
        result.rows.append({"id": row_id, "messages": messages})
        if limit is not None and len(result.rows) >= limit:
            break
    result.truncated_bytes = records.truncated_bytes
    if result.truncated_bytes:
        logger.warning(
            "%s ends mid-record (truncated JSON array): recovered %d complete records, "
            "dropped the last %d bytes",
            path,
            result.total,
            result.truncated_bytes,
        )
    if result.skipped:
        logger.info("%s: %s", path.name, result.summary())
    return result


def load_mtbench(source: str = "asset:mtbench") -> list[dict[str, Any]]:
    """Load MT-Bench (FastChat ``question.jsonl``) as ``{"id", "category", "turns"}`` prompts.

    Unlike seed data this is an evaluation set: a bad line raises (naming it) instead of being
    skipped, since silently dropping questions would change the benchmark.
    """
    from sd2_hf.assets import resolve_data

    path = Path(resolve_data(source))
    questions = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                question = {
                    "id": str(record["question_id"]),
                    "category": str(record["category"]),
                    "turns": list(record["turns"]),
                }
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{path}:{number}: not an MT-Bench question ({err!r}); expected a JSON object "
                    "with question_id, category and turns"
                ) from None
            if not question["turns"] or not all(isinstance(t, str) for t in question["turns"]):
                raise ValueError(f"{path}:{number}: 'turns' must be a non-empty list of strings")
            questions.append(question)
    return questions
