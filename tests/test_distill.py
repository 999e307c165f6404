"""Self-data distillation on the transformers backend and with scripted backends (no vLLM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import load_dataset

from sd2_hf.data.backends import Generation, Sampling, TransformersBackend
from sd2_hf.data.distill import DistillConfig, run_distill

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def two_turn_rows(n: int) -> list[dict]:
    return [
        {
            "id": f"multi-{i}",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": f"first question {i}"},
                {"role": "assistant", "content": f"original first answer {i}"},
                {"role": "user", "content": f"second question {i}"},
                {"role": "assistant", "content": f"original second answer {i}"},
            ],
        }
        for i in range(n)
    ]


@pytest.fixture()
def seed_file(tmp_path, chat_rows):
    rows = [{"id": f"row-{i}", **r} for i, r in enumerate(chat_rows)] + two_turn_rows(4)
    return write_jsonl(tmp_path / "seed.jsonl", rows)


@pytest.fixture()
def on_tiny(tmp_path, tiny_model_dir, seed_file):
    """`on_tiny(name, **options)`: the `DistillConfig` of the tiny target (transformers backend)
    on `seed_file` into `tmp_path / name`, truncated replies kept unless `options` say so."""

    def config(name: str, **options) -> DistillConfig:
        values = {
            "target": str(tiny_model_dir),
            "source": str(seed_file),
            "filter_truncated": False,
        }
        return DistillConfig(**(values | {"output": str(tmp_path / name)} | options))

    return config


def read_seed(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_rows(output: Path) -> list[dict]:
    return [
        json.loads(line)
        for shard in sorted((output / "data").glob("train-*.jsonl"))
        for line in shard.read_text().splitlines()
    ]


class ScriptedBackend:
    """Replies derived from the last user message; records every prompt it is given.

    Markers in the user message choose the outcome: EMPTY -> "", META -> a meta-phrase,
    LONG -> hits the token limit, FAIL -> request error.
    """

    name = "scripted"

    def __init__(self, fail: bool = True):
        self.prompts: list[list[dict]] = []
        self.fail = fail

    def generate(self, conversations, sampling, seeds=None, on_result=None):
        out = []
        for messages in conversations:
            self.prompts.append(messages)
            user = messages[-1]["content"]
            if "EMPTY" in user:
                gen = Generation("", 1, "stop", 10)
            elif "META" in user:
                gen = Generation("As an AI language model, I cannot.", 9, "stop", 10)
            elif "LONG" in user:
                gen = Generation("and so on " * 5, sampling.max_new_tokens, "length", 10)
            elif "FAIL" in user and self.fail:
                gen = Generation("", 0, "error", 10, error="server said no")
            else:
                n = sum(m["role"] == "assistant" for m in messages)
                gen = Generation(f"target reply {n} to: {user[:40]}", 7, "stop", 10)
            out.append(gen)
            if on_result:
                on_result(gen)
        return out

    def versions(self):
        return {}

    def close(self):
        pass


def config(tmp_path: Path, source: Path, **overrides) -> DistillConfig:
    values = {"target": "scripted", "source": str(source), "output": str(tmp_path / "out")}
    return DistillConfig(**(values | overrides))


def assert_accounting_closes(output: Path, expected_input: int) -> dict:
    manifest = json.loads((output / "manifest.json").read_text())
    c = manifest["counts"]
    assert c["input"] == expected_input
    assert c["written"] + c["filtered"] + c["failed"] == c["input"]
    assert sum(c["filtered_by_reason"].values()) == c["filtered"]
    assert sum(c["failed_by_reason"].values()) == c["failed"]
    assert len(read_rows(output)) == c["written"]
    return manifest


# ---------------------------------------------------------------------------------------------


def test_config_rejects_bad_combinations(tmp_path):
    base = {"target": "t", "source": "s", "output": str(tmp_path)}
    with pytest.raises(ValueError, match="only apply to backend='vllm'"):
        DistillConfig(**base, server_urls=["http://127.0.0.1:1"])
    with pytest.raises(ValueError, match="must contain \\{reference\\}"):
        DistillConfig(**base, mode="rewrite", rewrite_template="{prompt} only")
    with pytest.raises(ValueError, match="http:// or https://"):
        DistillConfig(**base, backend="vllm", server_urls=["localhost:8000"])
    with pytest.raises(ValueError, match="extra"):
        DistillConfig(**base, temprature=0.5)
    with pytest.raises(ValueError, match="greater than 0"):
        DistillConfig(**base, max_new_tokens=0)


def test_transformers_backend_distills_and_loads(tiny_model_dir, seed_file, on_tiny):
    cfg = on_tiny("out", max_new_tokens=12, batch_size=4, shard_size=8)
    result = run_distill(cfg)
    out = Path(cfg.output)
    manifest = assert_accounting_closes(out, 20)
    assert result.written == 20 and result.complete
    assert manifest["versions"]["transformers"] and manifest["versions"]["torch"]
    assert manifest["sampling"] == {
        "temperature": 0.0,
        "top_p": 1.0,
        "max_new_tokens": 12,
        "seed": 0,
        "greedy": True,
    }
    assert manifest["this_run"]["generated_tokens"] > 0

    ds = load_dataset(str(out), split="train")
    assert sorted(ds.column_names) == ["id", "messages"]
    assert len(ds) == 20 and len(set(ds["id"])) == 20
    seeds = {
        json.loads(line)["id"]: json.loads(line) for line in seed_file.read_text().splitlines()
    }
    for row in ds:
        source = seeds[row["id"]]["messages"]
        # Same turn structure; user turns and the system turn are kept verbatim.
        assert [m["role"] for m in row["messages"]] == [m["role"] for m in source]
        for new, old in zip(row["messages"], source, strict=True):
            if old["role"] != "assistant":
                assert new["content"] == old["content"]

    # The output equals what the backend generates for the same prompt (no reordering of rows).
    backend = TransformersBackend(str(tiny_model_dir), batch_size=1)
    first = next(r for r in ds if r["id"] == "row-0")
    gen = backend.generate([first["messages"][:1]], Sampling(max_new_tokens=12))[0]
    assert first["messages"][1]["content"] == gen.text
    assert gen.num_tokens == 12 or gen.finish_reason == "stop"

    # A second run of the same command has nothing left to do.
    again = run_distill(cfg)
    assert again.resumed == 20 and again.generated_tokens == 0
    assert len(read_rows(out)) == 20


def test_sampling_is_reproducible_per_seed(tmp_path, on_tiny):
    def sampled(name: str, seed: int) -> list[dict]:
        run_distill(on_tiny(name, limit=4, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=seed))
        return read_rows(tmp_path / name)

    first, again, other = sampled("a", 1), sampled("b", 1), sampled("c", 2)
    assert first == again
    assert first != other


def test_sampled_rows_do_not_depend_on_the_batch_size(tmp_path, tiny_model_dir, on_tiny):
    """Each row samples with its own seed: batch neighbours and batch_size (which a resume may
    change) do not change its reply."""

    def sampled(batch_size: int) -> list[dict]:
        name = f"batch-{batch_size}"
        run_distill(on_tiny(name, max_new_tokens=8, temperature=1.0, batch_size=batch_size))
        return sorted(read_rows(tmp_path / name), key=lambda r: r["id"])

    one, four = sampled(1), sampled(4)
    assert len(one) == 20  # 16 one-turn and 4 two-turn conversations
    assert one == four
    # Sampled, not greedy: the same prompts answered greedily differ.
    greedy = TransformersBackend(str(tiny_model_dir), batch_size=4)
    first_turns = [r["messages"][:1] for r in one if len(r["messages"]) == 2]
    replies = greedy.generate(first_turns, Sampling(max_new_tokens=8))
    assert [g.text for g in replies] != [r["messages"][1]["content"] for r in one[: len(replies)]]


def test_per_row_sampler_draws_from_the_warped_distribution():
    """The per-row draw samples softmax(logits / T) restricted to the top-p nucleus, like
    transformers' own sampler, and each row's draws follow its own seed only."""
    import torch

    from sd2_hf.data.sampling import per_row_sampling_processors

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    # T = 2 flattens p to p**0.5 / sum = (0.38, 0.29, 0.21, 0.12); top_p = 0.85 keeps the
    # first three (mass 0.88) and drops the last.
    warped = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    warped = warped / warped.sum()
    nucleus = torch.cat([warped[:3] / warped[:3].sum(), torch.zeros(1)])
    processors = per_row_sampling_processors([7], temperature=2.0, top_p=0.85)
    draws = torch.tensor([int(processors(None, logits.clone()).argmax()) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert freq[3] == 0  # outside the nucleus: never drawn
    assert torch.allclose(freq, nucleus, atol=0.03), (freq, nucleus)

    # Row 1 of a batch draws what it draws alone with the same seed, whatever row 0 is.
    batch = torch.randn(2, 50)
    alone = per_row_sampling_processors([3], temperature=1.0, top_p=1.0)
    paired = per_row_sampling_processors([11, 3], temperature=1.0, top_p=1.0)
    for _ in range(20):
        assert paired(None, batch.clone())[1].argmax() == alone(None, batch[1:].clone()).argmax()


def test_token_limit_filter_is_counted(tiny_model_dir, seed_file, on_tiny):
    cfg = on_tiny("out", max_new_tokens=2, limit=6, filter_truncated=True)
    result = run_distill(cfg)
    manifest = assert_accounting_closes(Path(cfg.output), 6)
    # A random tiny model rarely emits EOS within 2 tokens: (almost) every row hits the limit.
    prompts = [r["messages"][:1] for r in read_seed(seed_file)[:6]]
    gens = TransformersBackend(str(tiny_model_dir)).generate(prompts, Sampling(max_new_tokens=2))
    hit_limit = sum(g.finish_reason == "length" for g in gens)
    assert hit_limit > 0
    assert result.filtered_by_reason == {"truncated": hit_limit}
    assert result.written == 6 - hit_limit
    assert manifest["counts"]["filtered_by_reason"] == {"truncated": hit_limit}


def test_filters_count_each_reason(tmp_path):
    rows = [
        {"id": "ok", "messages": [{"role": "user", "content": "fine"}]},
        {"id": "empty", "messages": [{"role": "user", "content": "EMPTY please"}]},
        {"id": "meta", "messages": [{"role": "user", "content": "META please"}]},
        {"id": "long", "messages": [{"role": "user", "content": "LONG please"}]},
        {"id": "fail", "messages": [{"role": "user", "content": "FAIL please"}]},
        {"id": "bad-role", "messages": [{"role": "wizard", "content": "x"}]},
        {"id": "no-turns", "messages": []},
    ]
    source = write_jsonl(tmp_path / "seed.jsonl", rows)
    (tmp_path / "seed.jsonl").write_text(source.read_text() + "{not json\n")
    result = run_distill(config(tmp_path, source), backend=ScriptedBackend())
    manifest = assert_accounting_closes(tmp_path / "out", 5)
    assert result.filtered_by_reason == {"empty": 1, "meta_phrase": 1, "truncated": 1}
    assert result.failed_by_reason == {"request_failed": 1}
    assert (result.written, result.filtered, result.failed) == (1, 3, 1)
    assert not result.complete
    # Malformed rows are the loader's to count; they flow into the manifest, not into `input`.
    skipped = manifest["counts"]["loader_skipped"]
    assert skipped == {"unknown_role": 1, "empty_conversation": 1, "invalid_json": 1}
    assert manifest["failed_examples"] == [{"id": "fail", "error": "server said no"}]

    # Keeping truncated rows and an empty phrase list turns two filters off.
    result = run_distill(
        config(
            tmp_path, source, output=str(tmp_path / "out2"), filter_truncated=False, meta_phrases=[]
        ),
        backend=ScriptedBackend(),
    )
    assert result.filtered_by_reason == {"empty": 1}


def test_failed_rows_are_retried_on_resume(tmp_path):
    rows = [
        {"id": f"r{i}", "messages": [{"role": "user", "content": f"FAIL {i}"}]} for i in range(3)
    ]
    rows.append({"id": "good", "messages": [{"role": "user", "content": "fine"}]})
    source = write_jsonl(tmp_path / "seed.jsonl", rows)
    first = run_distill(config(tmp_path, source, shard_size=2), backend=ScriptedBackend())
    assert (first.written, first.failed) == (1, 3)
    backend = ScriptedBackend(fail=False)
    second = run_distill(config(tmp_path, source, shard_size=2), backend=backend)
    assert (second.written, second.failed, second.resumed) == (4, 0, 1)
    # Only the failed rows were generated again.
    assert sorted(p[-1]["content"] for p in backend.prompts) == ["FAIL 0", "FAIL 1", "FAIL 2"]
    assert sorted(r["id"] for r in read_rows(tmp_path / "out")) == ["good", "r0", "r1", "r2"]
    assert_accounting_closes(tmp_path / "out", 4)


def test_multi_turn_is_on_policy(tmp_path):
    source = write_jsonl(tmp_path / "seed.jsonl", two_turn_rows(3))
    backend = ScriptedBackend()
    run_distill(config(tmp_path, source, batch_size=2), backend=backend)
    # Turn by turn across conversations: all first turns, then all second turns.
    assert [len(p) for p in backend.prompts] == [2, 2, 2, 4, 4, 4]
    for prompt in backend.prompts[3:]:
        i = prompt[1]["content"].rsplit(" ", 1)[1]
        assert prompt[0] == {"role": "system", "content": "You are terse."}
        # The second turn sees the target's own first reply, not the dataset's.
        assert prompt[2] == {
            "role": "assistant",
            "content": f"target reply 0 to: first question {i}",
        }
    rows = {r["id"]: r["messages"] for r in read_rows(tmp_path / "out")}
    assert rows["multi-0"][4]["content"] == "target reply 1 to: second question 0"

    # max_turns keeps only the first user turn.
    backend = ScriptedBackend()
    run_distill(
        config(tmp_path, source, output=str(tmp_path / "one"), max_turns=1), backend=backend
    )
    assert all(len(m) == 3 for m in (r["messages"] for r in read_rows(tmp_path / "one")))


def test_rewrite_mode_shows_reference_and_keeps_original_on_failed_check(tmp_path):
    rows = two_turn_rows(2)
    rows[1]["messages"][3]["content"] = "second question META 1"
    source = write_jsonl(tmp_path / "seed.jsonl", rows)
    backend = ScriptedBackend()
    result = run_distill(config(tmp_path, source, mode="rewrite"), backend=backend)
    first_prompt = backend.prompts[0]
    assert "original first answer 0" in first_prompt[-1]["content"]
    assert first_prompt[-1]["content"].startswith("first question 0")
    assert result.kept_original_by_reason == {"meta_phrase": 1}
    assert (result.written, result.filtered) == (2, 0)
    out = {r["id"]: r["messages"] for r in read_rows(tmp_path / "out")}
    # The stored conversation has the plain user turns, the rewrites, and the kept original.
    assert out["multi-1"][1]["content"] == "first question 1"
    assert out["multi-1"][2]["content"].startswith("target reply")
    assert out["multi-1"][4]["content"] == "original second answer 1"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["kept_original_by_reason"] == {"meta_phrase": 1}


def test_changed_settings_refuse_to_mix(tmp_path):
    source = write_jsonl(tmp_path / "seed.jsonl", two_turn_rows(2))
    run_distill(config(tmp_path, source), backend=ScriptedBackend())
    with pytest.raises(ValueError, match="temperature: 0.0 -> 0.7"):
        run_distill(config(tmp_path, source, temperature=0.7), backend=ScriptedBackend())
    # Operational settings may change on resume.
    assert (
        run_distill(config(tmp_path, source, batch_size=3), backend=ScriptedBackend()).resumed == 2
    )
    again = run_distill(
        config(tmp_path, source, mode="rewrite", overwrite=True), backend=ScriptedBackend()
    )
    assert again.resumed == 0 and again.written == 2


def test_a_resume_refuses_another_served_dtype(tmp_path, monkeypatch, tiny_model_dir):
    """Rows distilled where vLLM's `auto` served bf16 must not be continued where it serves
    fp32 (a CPU without bf16 instructions, see `served_dtype`), and the error says so."""
    from sd2_hf.utils import models

    source = write_jsonl(tmp_path / "seed.jsonl", two_turn_rows(2))
    run_distill(
        config(tmp_path, source, backend="vllm", target=str(tiny_model_dir)),
        backend=ScriptedBackend(),
    )
    monkeypatch.setattr(models, "served_dtype", lambda model, dtype: "float32")
    with pytest.raises(ValueError, match="served_dtype: None -> 'float32'"):
        run_distill(config(tmp_path, source, backend="vllm", target=str(tiny_model_dir)))
    saved = json.loads((tmp_path / "out" / "distill_config.json").read_text())
    assert "served_dtype" not in saved and len(read_rows(tmp_path / "out")) == 2
    # And the other way round: rows made in fp32 there are not continued where `auto` is bf16.
    (tmp_path / "out" / "distill_config.json").write_text(
        json.dumps({**saved, "served_dtype": "float32"})
    )
    monkeypatch.setattr(models, "served_dtype", lambda model, dtype: dtype)
    with pytest.raises(ValueError, match="served_dtype: 'float32' -> None"):
        run_distill(config(tmp_path, source, backend="vllm", target=str(tiny_model_dir)))


def test_unicode_line_separators_stay_inside_their_row(tmp_path):
    text = "line one\u2028line two\u2029and \u00e9\u4e2d"
    source = write_jsonl(
        tmp_path / "seed.jsonl", [{"id": "u", "messages": [{"role": "user", "content": text}]}]
    )
    run_distill(config(tmp_path, source), backend=ScriptedBackend())
    rows = read_rows(tmp_path / "out")  # str.splitlines treats U+2028/U+2029 as line breaks
    assert len(rows) == 1 and rows[0]["messages"][0]["content"] == text
    assert load_dataset(str(tmp_path / "out"), split="train")[0]["messages"][0]["content"] == text


def test_one_writer_per_output_directory(tmp_path):
    import fcntl

    source = write_jsonl(tmp_path / "seed.jsonl", two_turn_rows(1))
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another sd2 distill is writing"):
            run_distill(config(tmp_path, source), backend=ScriptedBackend())
    assert run_distill(config(tmp_path, source), backend=ScriptedBackend()).written == 1


def test_uncommitted_shard_is_discarded(tmp_path):
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"q {i}"}]} for i in range(4)]
    source = write_jsonl(tmp_path / "seed.jsonl", rows)
    run_distill(config(tmp_path, source, shard_size=2), backend=ScriptedBackend())
    out = tmp_path / "out"
    # Simulate a kill between writing shard 1 and its journal record.
    (out / "journal" / "commit-00001.json").unlink()
    (out / "data" / ".train-00002.jsonl.x.tmp").write_text("partial")
    result = run_distill(config(tmp_path, source, shard_size=2), backend=ScriptedBackend())
    assert result.resumed == 2
    ids = [r["id"] for r in read_rows(out)]
    assert sorted(ids) == ["r0", "r1", "r2", "r3"]
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "train-00000.jsonl",
        "train-00001.jsonl",
    ]


def test_kill_and_resume_gives_the_uninterrupted_rows(tmp_path, tiny_model_dir, seed_file, on_tiny):
    args = [
        "--target", str(tiny_model_dir), "--source", str(seed_file),
        "--max-new-tokens", "24", "--no-filter-truncated", "--shard-size", "2", "--batch-size", "2",
    ]  # fmt: skip
    # One intra-op thread in every run: the same reduction order, so greedy rows are identical.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    sd2 = [sys.executable, "-m", "sd2_hf.cli", "distill"]
    killed_out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*sd2, *args, "--output", str(killed_out)],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first_commit = killed_out / "journal" / "commit-00000.json"
    deadline = time.monotonic() + 300
    while not first_commit.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    commits = len(list((killed_out / "journal").glob("commit-*.json")))
    assert 1 <= commits < 10  # 20 rows in shards of 2: killed mid-run
    assert not (killed_out / "manifest.json").exists()

    resumed = subprocess.run(
        [*sd2, *args, "--output", str(killed_out)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    manifest = assert_accounting_closes(killed_out, 20)
    assert manifest["this_run"]["rows_resumed"] == 2 * commits

    # The reference runs in this process, also with one thread (the `single_torch_thread` mark).
    run_distill(on_tiny("reference", max_new_tokens=24, shard_size=2, batch_size=2))
    got, want = read_rows(killed_out), read_rows(tmp_path / "reference")
    assert len({r["id"] for r in got}) == len(got) == 20
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(got, key=key) == sorted(want, key=key)
