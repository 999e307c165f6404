"""Self-data distillation (SPEC §2): the target model regenerates the assistant turns of a seed
dataset, so the drafter is later trained on the target's own distribution.

Multi-turn conversations stay on-policy: each assistant turn is generated from the conversation
so far *including the target's own earlier replies*. Work proceeds in windows of `shard_size`
rows; inside a window all conversations advance one turn at a time in batches. A finished window
is committed as a JSONL shard plus a journal record, so a killed job resumes where it stopped
with no duplicate and no missing row.

Output directory:
    data/train-XXXXX.jsonl      written rows: {"id", "messages"} (shards)
    journal/commit-XXXXX.json   outcome of every row of one window (written/filtered/failed)
    distill_config.json         the settings that define the dataset (checked on resume)
    manifest.json               counts per reason, sampling, versions, timing
    README.md                   dataset card
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from sd2_hf.data.backends import Generation, GenerationBackend, ResultCallback
from sd2_hf.data.config import DistillConfig
from sd2_hf.data.loaders import LoadResult, load_conversations
from sd2_hf.utils.io import atomic_write_json, atomic_write_text, read_json
from sd2_hf.utils.provenance import git_revision, package_versions

logger = logging.getLogger(__name__)

CONFIG_FILE = "distill_config.json"
MANIFEST_FILE = "manifest.json"
DATA_DIR = "data"
JOURNAL_DIR = "journal"


@dataclass
class DistillResult:
    """Counts of a finished run; `manifest.json` has the full record."""

    output: str
    input: int
    written: int
    filtered: int
    failed: int
    filtered_by_reason: dict[str, int]
    failed_by_reason: dict[str, int]
    kept_original_by_reason: dict[str, int]
    loader_skipped: dict[str, int]
    resumed: int
    generated_tokens: int
    tokens_per_second: float
    wall_time_s: float
    data_files: list[str]

    @property
    def complete(self) -> bool:
        """Every input row is written or filtered (failed rows are retried by a rerun)."""
        return self.failed == 0

    @property
    def manifest_path(self) -> str:
        return str(Path(self.output) / MANIFEST_FILE)

    def summary(self) -> str:
        def reasons(counts: dict[str, int]) -> str:
            return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "-"

        lines = [
            f"sd2 distill -> {self.output}",
            f"  input     {self.input:>8} rows   (loader skipped {sum(self.loader_skipped.values())}: "
            f"{reasons(self.loader_skipped)})",
            f"  written   {self.written:>8}",
            f"  filtered  {self.filtered:>8}        ({reasons(self.filtered_by_reason)})",
            f"  failed    {self.failed:>8}        ({reasons(self.failed_by_reason)})",
        ]
        if self.kept_original_by_reason:
            lines.append(
                f"  rewrite kept the original answer: {reasons(self.kept_original_by_reason)}"
            )
        lines += [
            f"  this run  {self.input - self.resumed:>8} rows processed, {self.resumed} resumed "
            f"from the journal; {self.generated_tokens} tokens in {self.wall_time_s:.1f} s "
            f"({self.tokens_per_second:.1f} tokens/s while generating)",
            f"  dataset   {len(self.data_files)} shards: datasets.load_dataset({self.output!r})",
        ]
        if self.failed:
            lines.append("  INCOMPLETE: rerun the same command to retry the failed rows")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Conversation state


@dataclass
class _Row:
    """One conversation being regenerated turn by turn."""

    id: str
    source: list[dict]
    out: list[dict] = field(default_factory=list)
    pos: int = 0
    turn: int = 0
    tokens: int = 0
    kept_original: list[str] = field(default_factory=list)
    status: Literal["written", "filtered", "failed"] | None = None
    reason: str | None = None
    error: str | None = None

    def next_prompt(self) -> tuple[list[dict], str | None] | None:
        """The messages to answer next and the original answer (None for a trailing prompt).

        Returns None when the conversation is complete.
        """
        while self.pos < len(self.source) and self.source[self.pos]["role"] != "assistant":
            self.out.append(dict(self.source[self.pos]))
            self.pos += 1
        if self.pos < len(self.source):
            return list(self.out), self.source[self.pos]["content"]
        if self.out and self.out[-1]["role"] == "user":
            return list(self.out), None
        return None

    def finish(self, status: Literal["written", "filtered", "failed"], reason: str | None = None):
        self.status, self.reason = status, reason


def _truncate_turns(messages: list[dict], max_turns: int | None) -> list[dict]:
    if max_turns is None:
        return messages
    users = 0
    for i, m in enumerate(messages):
        if m["role"] == "user":
            users += 1
            if users > max_turns:
                return messages[:i]
    return messages


def _with_reference(prompt: list[dict], reference: str, template: str) -> list[dict]:
    """SDFT-style rewrite prompt: the last user message carries the original answer."""
    last = prompt[-1]
    content = template.format(prompt=last["content"], reference=reference)
    return [*prompt[:-1], {**last, "content": content}]


def _request_seed(seed: int, row_id: str, turn: int) -> int:
    digest = hashlib.sha256(f"{seed}:{row_id}:{turn}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class _Filters:
    def __init__(self, config: DistillConfig):
        self.filter_truncated = config.filter_truncated
        self.phrases = [p.lower() for p in config.meta_phrases]
        self.max_conversation_tokens = config.max_conversation_tokens

    def reason(self, gen: Generation) -> str | None:
        """Why a generated reply is unusable, or None when it passes."""
        if gen.finish_reason == "too_long":
            return "too_long"
        if not gen.text.strip():
            return "empty"
        if gen.finish_reason == "length" and self.filter_truncated:
            return "truncated"
        lowered = gen.text.lower()
        if any(p in lowered for p in self.phrases):
            return "meta_phrase"
        if (
            self.max_conversation_tokens
            and gen.prompt_tokens + gen.num_tokens > self.max_conversation_tokens
        ):
            return "too_long"
        return None


def _distill_window(
    rows: list[_Row],
    backend: GenerationBackend,
    config: DistillConfig,
    on_result: ResultCallback | None = None,
    on_row_done: Callable[[_Row], None] | None = None,
) -> None:
    """Advance every row of the window turn by turn until each is written, filtered or failed."""
    filters = _Filters(config)
    sampling = config.sampling()
    active = rows
    while active:
        batch: list[tuple[_Row, list[dict], str | None]] = []
        for row in active:
            step = row.next_prompt()
            if step is not None:
                batch.append((row, *step))
            elif row.turn == 0:
                row.finish("filtered", "nothing_to_generate")
            else:
                row.finish("written")
            if row.status and on_row_done:
                on_row_done(row)
        if not batch:
            break
        prompts = [
            _with_reference(prompt, ref, config.rewrite_template)
            if config.mode == "rewrite" and ref is not None
            else prompt
            for _, prompt, ref in batch
        ]
        seeds = [_request_seed(config.seed, row.id, row.turn) for row, _, _ in batch]
        gens = backend.generate(prompts, sampling, seeds=seeds, on_result=on_result)
        for (row, _, ref), gen in zip(batch, gens, strict=True):
            row.tokens += gen.num_tokens
            if gen.finish_reason == "error":
                row.error = gen.error
                row.finish("failed", "request_failed")
            elif (reason := filters.reason(gen)) is None:
                row.out.append({"role": "assistant", "content": gen.text})
            elif config.mode == "rewrite" and ref is not None:
                row.kept_original.append(reason)
                row.out.append({"role": "assistant", "content": ref})
            else:
                # Later turns would be conditioned on an unusable reply: drop the conversation.
                row.finish("filtered", reason)
            if row.status is None:
                row.pos += 1
                row.turn += 1
            elif on_row_done:
                on_row_done(row)
        active = [r for r in active if r.status is None]


# --------------------------------------------------------------------------------------------
# Output directory: identity check, journal, shards


class _Journal:
    """Finished windows of an output directory; the journal record is the commit point."""

    def __init__(self, output: Path):
        self.output = output
        self.data_dir = output / DATA_DIR
        self.journal_dir = output / JOURNAL_DIR
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        self.latest: dict[str, dict] = {}  # row id -> its latest outcome
        self.shards: list[str] = []
        commits = sorted(self.journal_dir.glob("commit-*.json"))
        for path in commits:
            record = read_json(path)
            if record.get("shard"):
                self.shards.append(record["shard"])
            self.latest.update(record["rows"])
        self.next_index = int(commits[-1].stem.split("-")[1]) + 1 if commits else 0
        self._remove_uncommitted()

    def _remove_uncommitted(self) -> None:
        """A kill between writing a shard and its journal record leaves an orphan shard (or
        temp files): its rows are not journaled, so they are redone and the orphan must go."""
        committed = {Path(s).name for s in self.shards}
        for path in self.data_dir.iterdir():
            if path.name not in committed:
                logger.info("removing uncommitted %s (its rows will be regenerated)", path)
                path.unlink()
        for path in self.journal_dir.iterdir():
            if not path.name.startswith("commit-"):
                path.unlink()

    def done(self, row_id: str) -> bool:
        entry = self.latest.get(row_id)
        return entry is not None and entry["status"] in ("written", "filtered")

    def commit(self, rows: list[_Row]) -> None:
        name = f"train-{self.next_index:05d}.jsonl"
        written = [r for r in rows if r.status == "written"]
        shard = None
        if written:
            text = "".join(
                # ASCII escapes: raw U+2028/U+2029 (real ShareGPT text has them) are line breaks
                # to `str.splitlines` and other line readers, which would split a row in two.
                json.dumps({"id": r.id, "messages": r.out}) + "\n"
                for r in written
            )
            atomic_write_text(self.data_dir / name, text)
            shard = f"{DATA_DIR}/{name}"
        outcomes = {}
        for r in rows:
            entry: dict[str, Any] = {"status": r.status, "tokens": r.tokens}
            if r.reason:
                entry["reason"] = r.reason
            if r.kept_original:
                entry["kept_original"] = r.kept_original
            if r.error:
                entry["error"] = r.error
            outcomes[r.id] = entry
        record = {
            "shard": shard,
            "time": _now(),
            "rows": outcomes,
        }
        atomic_write_json(self.journal_dir / f"commit-{self.next_index:05d}.json", record)
        if shard:
            self.shards.append(shard)
        self.latest.update(outcomes)
        self.next_index += 1


def _identity(
    config: DistillConfig, backend: GenerationBackend | None, target: Callable[[], str]
) -> dict[str, Any]:
    """The settings that define the rows, plus the dtype a server we start computes in where
    it is not the configured one (`served_dtype`: `auto` on a CPU without bf16 instructions),
    so a resume on another kind of machine cannot mix bf16 and fp32 replies."""
    identity = config.identity()
    if config.backend == "vllm" and not config.server_urls and backend is None:
        from sd2_hf.utils.models import served_dtype

        served = served_dtype(target(), config.dtype)
        if served != config.dtype:
            identity["served_dtype"] = served
    return identity


def _prepare_output(output: Path, config: DistillConfig, identity: dict[str, Any]) -> None:
    """Refuse to mix datasets: committed rows must come from the same identity.

    Before the first commit nothing can mix, so a run that failed early (a typo in the
    target, say) can be rerun with corrected settings without --overwrite.
    """
    config_path = output / CONFIG_FILE
    committed = any((output / JOURNAL_DIR).glob("commit-*.json"))
    if config.overwrite:
        # Only the files a distillation writes: `output` may hold unrelated files of the user.
        for name in (DATA_DIR, JOURNAL_DIR):
            shutil.rmtree(output / name, ignore_errors=True)
        for name in (CONFIG_FILE, MANIFEST_FILE, "README.md", "vllm-server.log"):
            (output / name).unlink(missing_ok=True)
    elif committed and not config_path.exists():
        raise ValueError(
            f"{output} has a journal but no {CONFIG_FILE}: it is not a complete sd2 distillation "
            "directory; use another output directory or pass --overwrite"
        )
    elif committed:
        previous = read_json(config_path)
        current = json.loads(json.dumps(identity))
        changed = {
            k: (previous.get(k), current.get(k))
            for k in sorted(current.keys() | previous.keys())
            if previous.get(k) != current.get(k)
        }
        if changed:
            details = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(
                f"{output} holds a distillation made with different settings:\n{details}\n"
                "Resuming would mix two datasets. Use another output directory, restore the "
                "settings, or pass --overwrite (overwrite=True) to start over."
            )
    atomic_write_json(config_path, identity)


def _dataset_card(config: DistillConfig, counts: dict[str, Any] | None) -> str:
    # No `configs` header on purpose: with one, datasets 5.2 caches `load_dataset(dir)` under a
    # key that ignores the data files (two outputs named alike, or one before and after a
    # resume, would share stale data). The `train-` shard names let datasets infer the split
    # from the files themselves, and its cache key then follows their changes.
    body = (
        "---\ntags:\n- sd2-hf\n- self-data-distillation\n---\n\n"
        f"# Self-distilled data\n\nThe `{config.mode}` responses of `{config.target}` to "
        f"`{config.source}`, made with `sd2 distill` (sd2-hf) for training speculative-decoding "
        "drafters. Columns: `id`, `messages`. Load with `datasets.load_dataset(<this dir>)`; "
        "`manifest.json` has sampling, counts and versions.\n"
    )
    if counts:
        body += "\n| input | written | filtered | failed |\n|---|---|---|---|\n"
        body += (
            f"| {counts['input']} | {counts['written']} | {counts['filtered']} | "
            f"{counts['failed']} |\n"
        )
    return body


# --------------------------------------------------------------------------------------------
# Run


@contextmanager
def _open_backend(
    config: DistillConfig, target_path: str, output: Path
) -> Iterator[GenerationBackend]:
    if config.backend == "transformers":
        from sd2_hf.data.backends import TransformersBackend

        options = config.model_dump(include={"batch_size", "dtype", "device", "max_prompt_tokens"})
        with closing(TransformersBackend(target_path, **options)) as backend:
            yield backend
        return

    from sd2_hf.data.backends import VLLMBackend

    options = config.model_dump(
        include={"concurrency", "request_timeout", "max_retries", "backoff", "max_prompt_tokens"}
    )
    if config.server_urls:
        with closing(VLLMBackend(target_path, config.server_urls, **options)) as backend:
            yield backend
        return

    from sd2_hf.serving import VLLMServer

    server = VLLMServer(
        target_path,
        dtype=config.dtype,
        max_model_len=config.vllm_max_model_len,
        extra_args=config.vllm_extra_args,
        startup_timeout=config.vllm_startup_timeout,
        log_path=str(output / "vllm-server.log"),
    )
    with server:
        backend = VLLMBackend(target_path, [server.url], model_name=server.model_name, **options)
        with closing(backend):
            yield backend


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Progress:
    """tqdm bar over rows, with generated tokens/s as postfix."""

    def __init__(self, total: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="row", desc="distill", dynamic_ncols=True)
        self.tokens = 0
        self.start = time.perf_counter()
        self._last = 0.0

    def on_result(self, gen: Generation) -> None:
        self.tokens += gen.num_tokens
        now = time.perf_counter()
        if now - self._last > 0.5:
            self._last = now
            self.bar.set_postfix_str(f"{self.tokens / (now - self.start):.1f} tok/s", refresh=True)

    def on_row_done(self, row: _Row) -> None:
        self.bar.update(1)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def close(self) -> None:
        self.bar.close()


def run_distill(config: DistillConfig, backend: GenerationBackend | None = None) -> DistillResult:
    """Distill `config.source` with `config.target` into `config.output` (resuming if present).

    `backend` replaces the one `config.backend` would open (e.g. a model already in memory).
    """
    from sd2_hf.utils.models import resolve_model_path

    output = Path(config.output)
    # The target resolved at most once per run (a Hub id costs a request), only where needed:
    # a complete resume does not need it.
    target = functools.cache(lambda: resolve_model_path(config.target))
    # Inputs are read and checked before anything is written: a typo leaves no directory.
    loaded = load_conversations(config.source, format=config.format, limit=config.limit)
    if backend is None and not output.exists():
        target()
    output.mkdir(parents=True, exist_ok=True)
    with _exclusive(output):
        return _run(config, backend, output, loaded, target)


@contextmanager
def _exclusive(output: Path) -> Iterator[None]:
    """One writer per output directory: two jobs appending to one journal would duplicate rows.

    An advisory lock dies with its process, so a killed job never blocks the rerun."""
    import fcntl

    with open(output / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"another sd2 distill is writing to {output}; wait for it or use another output"
            ) from None
        yield


def _run(
    config: DistillConfig,
    backend: GenerationBackend | None,
    output: Path,
    loaded: LoadResult,
    target: Callable[[], str],
) -> DistillResult:
    """Distill the rows the journal has not committed yet, then write the manifest and the
    dataset card from the journal's account of every input row."""
    wall_start, started_at = time.perf_counter(), _now()
    _prepare_output(output, config, _identity(config, backend, target))
    _check_rows(config, loaded)
    atomic_write_text(output / "README.md", _dataset_card(config, None))
    journal = _Journal(output)
    pending = [
        _Row(r["id"], _truncate_turns(r["messages"], config.max_turns))
        for r in loaded.rows
        if not journal.done(r["id"])
    ]
    resumed = len(loaded.rows) - len(pending)
    if resumed:
        logger.info("resuming %s: %d rows done, %d to go", output, resumed, len(pending))

    versions: dict[str, Any] = package_versions(python=True, vllm=True)
    failures: list[_Row] = []
    generated, gen_time = 0, 0.0
    target_path = config.target
    if pending:
        if backend is None:
            target_path = target()
        failures, generated, gen_time = _distill_pending(
            config, backend, target_path, output, pending, journal, versions
        )

    input_ids = {r["id"] for r in loaded.rows}
    latest = {i: e for i, e in journal.latest.items() if i in input_ids}
    counts = _counts(latest, loaded)
    tokens_per_second = generated / gen_time if gen_time > 0 else 0.0
    wall = time.perf_counter() - wall_start
    result = DistillResult(
        output=str(output),
        **{k: v for k, v in counts.items() if k in DistillResult.__dataclass_fields__},
        resumed=resumed,
        generated_tokens=generated,
        tokens_per_second=tokens_per_second,
        wall_time_s=wall,
        data_files=[str(output / s) for s in journal.shards],
    )
    this_run = {
        "start_time": started_at,
        "end_time": _now(),
        "wall_time_s": round(wall, 3),
        "generation_time_s": round(gen_time, 3),
        "rows_processed": len(pending),
        "rows_resumed": resumed,
        "generated_tokens": generated,
        "tokens_per_second": round(tokens_per_second, 2),
        "batch_size": config.batch_size,
        "concurrency": config.concurrency,
        "server_urls": config.server_urls,
    }
    manifest = _manifest(
        config,
        target_path=target_path,
        counts=counts,
        complete=result.complete,
        failures=failures,
        shards=journal.shards,
        this_run=this_run,
        latest=latest,
        versions=versions,
    )
    atomic_write_json(output / MANIFEST_FILE, manifest)
    atomic_write_text(output / "README.md", _dataset_card(config, counts))
    return result


def _check_rows(config: DistillConfig, loaded: LoadResult) -> None:
    """Row ids must be unique (`ValueError` otherwise); rows the loader skipped are logged."""
    ids = Counter(r["id"] for r in loaded.rows)
    duplicates = [i for i, n in ids.items() if n > 1]
    if duplicates:
        raise ValueError(
            f"{config.source}: row ids must be unique to account for and resume every row; "
            f"{len(duplicates)} ids repeat (e.g. {duplicates[:3]})"
        )
    if loaded.skipped:
        logger.warning(
            "%s: the loader skipped %d malformed rows: %s",
            config.source,
            sum(loaded.skipped.values()),
            dict(loaded.skipped),
        )


def _distill_pending(
    config: DistillConfig,
    backend: GenerationBackend | None,
    target_path: str,
    output: Path,
    pending: list[_Row],
    journal: _Journal,
    versions: dict[str, Any],
) -> tuple[list[_Row], int, float]:
    """Distill `pending` one shard at a time, each committed to the journal when done, with
    `backend` or else the one `config` opens; adds the backend's versions to `versions`.
    Returns the failed rows, the tokens generated and the generation time."""
    failures: list[_Row] = []
    opened = _open_backend(config, target_path, output) if backend is None else _as_is(backend)
    with opened as active:
        progress = _Progress(total=len(pending))
        try:
            for start in range(0, len(pending), config.shard_size):
                window = pending[start : start + config.shard_size]
                _distill_window(window, active, config, progress.on_result, progress.on_row_done)
                journal.commit(window)
                failures += [r for r in window if r.status == "failed"]
        finally:
            progress.close()
        generated, gen_time = progress.tokens, progress.elapsed
        versions.update(active.versions())
    return failures, generated, gen_time


def _counts(latest: dict[str, dict[str, Any]], loaded: LoadResult) -> dict[str, Any]:
    """Written, filtered and failed rows (with their reasons) of the input, from the journal's
    latest entry per row; `RuntimeError` when they do not add up to the input."""
    by_status = Counter(e["status"] for e in latest.values())
    counts = {
        "input": len(loaded.rows),
        "written": by_status["written"],
        "filtered": by_status["filtered"],
        "failed": by_status["failed"],
        "filtered_by_reason": dict(
            Counter(e["reason"] for e in latest.values() if e["status"] == "filtered")
        ),
        "failed_by_reason": dict(
            Counter(e["reason"] for e in latest.values() if e["status"] == "failed")
        ),
        "kept_original_by_reason": dict(
            Counter(
                k
                for e in latest.values()
                if e["status"] == "written"
                for k in e.get("kept_original", [])
            )
        ),
        "loader_skipped": dict(loaded.skipped),
        "loader_total": loaded.total,
        "loader_truncated_bytes": loaded.truncated_bytes,
    }
    if counts["written"] + counts["filtered"] + counts["failed"] != counts["input"]:
        raise RuntimeError(f"distillation accounting does not close: {counts}")
    return counts


def _manifest(
    config: DistillConfig,
    *,
    target_path: str,
    counts: dict[str, Any],
    complete: bool,
    failures: list[_Row],
    shards: list[str],
    this_run: dict[str, Any],
    latest: dict[str, dict[str, Any]],
    versions: dict[str, Any],
) -> dict[str, Any]:
    """The content of manifest.json: settings, counts, shards, this run's figures, versions."""
    return {
        "target": config.target,
        "target_path": target_path,
        "source": config.source,
        "format": config.format,
        "mode": config.mode,
        "backend": config.backend,
        "sampling": {**asdict(config.sampling()), "greedy": config.sampling().greedy},
        "filters": {
            "filter_truncated": config.filter_truncated,
            "meta_phrases": config.meta_phrases,
            "max_conversation_tokens": config.max_conversation_tokens,
            "max_prompt_tokens": config.max_prompt_tokens,
        },
        "counts": counts,
        "complete": complete,
        "failed_examples": [{"id": r.id, "error": r.error} for r in failures[:5]],
        "shards": shards,
        "this_run": this_run,
        "total_generated_tokens": sum(e.get("tokens", 0) for e in latest.values()),
        "config": config.model_dump(),
        "command": sys.argv,
        "git": git_revision(),
        "versions": versions,
    }


@contextmanager
def _as_is(backend: GenerationBackend) -> Iterator[GenerationBackend]:
    yield backend
