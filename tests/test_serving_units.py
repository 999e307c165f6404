"""Serving pieces that need no vLLM: metrics parsing, the HTTP client, server set-up checks."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time

import fake_http
import pytest
import tiny
from fake_http import JSONHandler

from sd2_hf.serving import OpenAIClient, RequestFailed, SpecDecodeCounters, VLLMServer
from sd2_hf.serving.cli import curl_example
from sd2_hf.serving.config import ServeConfig
from sd2_hf.serving.metrics import parse_prometheus_text
from sd2_hf.utils.environment import VLLMEnvironmentError, vllm_python
from sd2_hf.utils.models import is_hybrid_attention, vocabularies_differ

# Captured from a vLLM 0.32 server (draft_model, K=3), trimmed, with a second engine added
# (data-parallel servers export one series per engine) and a label value with escapes.
METRICS_SAMPLE = r"""
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="/m/target"} 12.0
vllm:spec_decode_num_drafts_total{engine="1",model_name="/m/target"} 8.0
# HELP vllm:spec_decode_num_drafts_created Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_created gauge
vllm:spec_decode_num_drafts_created{engine="0",model_name="/m/target"} 1.7953241313067174e+09
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="/m/target"} 36.0
vllm:spec_decode_num_draft_tokens_total{engine="1",model_name="/m/target"} 24.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="/m/target"} 30.0
vllm:spec_decode_num_accepted_tokens_total{engine="1",model_name="/m/target"} 10.0
# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_total counter
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/m/target",position="0"} 12.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/m/target",position="1"} 10.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/m/target",position="2"} 8.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="/m/target",position="0"} 6.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="/m/target",position="1"} 3.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="/m/target",position="2"} 1.0
vllm:num_requests_running{engine="0",model_name="a \"quoted\\\" name\nx"} 0.0
process_cpu_seconds_total 12.5
"""


def test_parse_prometheus_text_reads_names_labels_and_escapes():
    samples = list(parse_prometheus_text(METRICS_SAMPLE))
    sample_lines = [s for s in METRICS_SAMPLE.splitlines() if s and not s.startswith("#")]
    assert len(samples) == len(sample_lines)
    name, labels, value = samples[-2]
    assert name == "vllm:num_requests_running"
    assert labels == {"engine": "0", "model_name": 'a "quoted\\" name\nx'}
    assert samples[-1] == ("process_cpu_seconds_total", {}, 12.5)
    with pytest.raises(ValueError, match="not a Prometheus sample line"):
        list(parse_prometheus_text("{broken} 1"))


def test_counters_sum_engines_and_give_mal_and_per_position_acceptance():
    counters = SpecDecodeCounters.from_prometheus_text(METRICS_SAMPLE)
    assert counters == SpecDecodeCounters(20, 60, 40, [18, 13, 9])
    assert counters.mal == 1 + 40 / 20
    assert counters.acceptance_per_position == [18 / 20, 13 / 20, 9 / 20]
    # Per-position counts add up to the accepted total, as vLLM counts them.
    assert sum(counters.accepted_per_position) == counters.num_accepted_tokens
    assert "MAL 3.000" in counters.summary()


def test_counter_deltas_and_empty_readings():
    empty = SpecDecodeCounters.from_prometheus_text("# no spec decoding\nvllm:x_total 3\n")
    assert empty == SpecDecodeCounters(0, 0, 0, [])
    assert math.isnan(empty.mal) and empty.acceptance_per_position == []
    assert "no drafts" in empty.summary()
    later = SpecDecodeCounters(30, 90, 70, [25, 25, 20])
    earlier = SpecDecodeCounters(10, 30, 20, [9, 7, 4])
    delta = later - earlier
    assert delta == SpecDecodeCounters(20, 60, 50, [16, 18, 16])
    assert delta.mal == 1 + 50 / 20
    # A reading from before any draft has no per-position series yet.
    assert later - empty == later
    with pytest.raises(ValueError, match="counters went down"):
        earlier - later


class _ScriptedHandler(JSONHandler):
    """Answers POSTs with the next (status, body) of the server's script; records requests."""

    def do_POST(self):  # noqa: N802 (http.server API)
        length = int(self.headers["Content-Length"])
        self.server.requests.append((self.path, json.loads(self.rfile.read(length))))
        self.reply(*self.server.script.pop(0))


@pytest.fixture()
def scripted_server():
    with fake_http.serving(_ScriptedHandler, script=[], requests=[]) as server:
        yield server


_url = fake_http.url


def test_client_retries_5xx_with_backoff_then_succeeds(scripted_server):
    ok = {"choices": [{"text": "hi"}]}
    scripted_server.script = [(503, {"error": {"message": "busy"}}), (500, {}), (200, ok)]
    client = OpenAIClient(_url(scripted_server), "m", max_retries=3, backoff=0.05)
    started = time.monotonic()
    assert client.completion([1, 2, 3], max_tokens=4, temperature=0) == ok
    assert time.monotonic() - started >= 0.05 + 0.1  # backoff, then twice the backoff
    assert len(scripted_server.requests) == 3
    path, body = scripted_server.requests[-1]
    assert path == "/v1/completions"
    assert body == {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}


def test_client_never_retries_4xx_and_reports_server_message(scripted_server):
    scripted_server.script = [(400, {"error": {"message": "max_tokens is too large"}})]
    client = OpenAIClient(_url(scripted_server), "m", max_retries=3, backoff=0.01)
    with pytest.raises(RequestFailed, match="HTTP 400: max_tokens is too large") as err:
        client.chat_completion([{"role": "user", "content": "hi"}], max_tokens=10**9)
    assert err.value.status_code == 400
    assert len(scripted_server.requests) == 1
    assert scripted_server.requests[0][0] == "/v1/chat/completions"


def test_client_gives_up_after_last_retry(scripted_server):
    scripted_server.script = [(502, {"error": "bad gateway"})] * 3
    client = OpenAIClient(_url(scripted_server), "m", max_retries=2, backoff=0.01)
    with pytest.raises(RequestFailed, match="after 3 attempts: HTTP 502: bad gateway"):
        client.completion("hello")
    # Nothing listening: connection errors are retried the same way.
    dead = OpenAIClient("http://127.0.0.1:9", "m", max_retries=1, backoff=0.01, timeout=2)
    with pytest.raises(RequestFailed, match="after 2 attempts: ConnectError"):
        dead.completion("hello")


def test_missing_model_dir_fails_fast_with_a_clear_message(tmp_path, tiny_model_dir):
    started = time.monotonic()
    with pytest.raises(FileNotFoundError, match="does not exist: pass an existing checkpoint"):
        VLLMServer(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        VLLMServer(str(tiny_model_dir), drafter=str(tmp_path))
    assert time.monotonic() - started < 5
    with pytest.raises(ValueError, match="needs a drafter"):
        VLLMServer(str(tiny_model_dir), num_draft_tokens=3)


def test_missing_vllm_environment_says_how_to_create_it(monkeypatch, tmp_path):
    monkeypatch.setenv("SD2_VLLM_PYTHON", str(tmp_path / "python"))
    with pytest.raises(VLLMEnvironmentError, match="run `make setup`"):
        vllm_python()


def test_heterogeneous_vocab_compares_vocabularies_not_sizes(
    tmp_path, tiny_model_dir, tiny_drafter_dir, other_family_dir
):
    assert not vocabularies_differ(str(tiny_model_dir), str(tiny_drafter_dir))
    assert vocabularies_differ(str(tiny_model_dir), str(other_family_dir))
    # Same vocabulary size, different token → id map.
    same_size = tiny.build_tokenizer(vocab_size=384, seed=3)
    assert len(same_size) == len(tiny.build_tokenizer(vocab_size=384, seed=0))
    path = tiny.save_model(tiny.build_model(same_size, num_layers=1), same_size, tmp_path / "m")
    assert vocabularies_differ(str(tiny_model_dir), str(path))


def test_server_command_sets_speculative_and_hybrid_options(
    monkeypatch, tmp_path, tiny_model_dir, tiny_drafter_dir, other_family_dir
):
    from transformers import Gemma3TextConfig

    monkeypatch.setenv("SD2_VLLM_PYTHON", sys.executable)
    same = VLLMServer(str(tiny_model_dir), drafter=str(tiny_drafter_dir), num_draft_tokens=3)
    cmd = same.command()
    spec = json.loads(cmd[cmd.index("--speculative-config") + 1])
    assert spec == {
        "method": "draft_model",
        "model": str(tiny_drafter_dir),
        "num_speculative_tokens": 3,
    }
    assert cmd[cmd.index("--generation-config") + 1] == "vllm"
    assert "--disable-hybrid-kv-cache-manager" not in cmd
    cross = VLLMServer(str(tiny_model_dir), drafter=str(other_family_dir), num_draft_tokens=2)
    assert cross.speculative_config["use_heterogeneous_vocab"] is True
    plain = VLLMServer(str(tiny_model_dir), extra_args=["--max-num-seqs", "4"])
    assert "--speculative-config" not in plain.command()
    assert plain.command()[-2:] == ["--max-num-seqs", "4"]

    # Gemma-3 style target (sliding-window and full-attention layers).
    gemma = tmp_path / "gemma"
    Gemma3TextConfig(num_hidden_layers=6, vocab_size=384).save_pretrained(gemma)
    assert is_hybrid_attention(str(gemma)) and not is_hybrid_attention(str(tiny_model_dir))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, gemma / name)
    hybrid = VLLMServer(str(gemma), drafter=str(tiny_drafter_dir), num_draft_tokens=3)
    assert "--disable-hybrid-kv-cache-manager" in hybrid.command()


def test_auto_dtype_keeps_float32_on_a_cpu_without_bf16(monkeypatch, tmp_path, tiny_model_dir):
    from sd2_hf.utils import environment, models

    cpuinfo = tmp_path / "cpuinfo"
    for text, native in [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n", False),
        ("flags\t\t: avx2 avx512f avx512_bf16\n", True),
        ("flags\t\t: avx2 amx_bf16 amx_tile\n", True),
        ("Features\t: fp asimd sve bf16\n", True),
        ("Features\t: fp asimd\n", False),
    ]:
        cpuinfo.write_text(text)
        assert environment.cpu_has_native_bf16(cpuinfo) is native, text
    assert environment.cpu_has_native_bf16(tmp_path / "absent") is None

    monkeypatch.setenv("SD2_VLLM_PYTHON", sys.executable)
    monkeypatch.setattr(environment, "has_gpu", lambda: False)
    monkeypatch.setattr(environment, "cpu_has_native_bf16", lambda: False)
    assert models.checkpoint_dtype(str(tiny_model_dir)) == "float32"
    plain = VLLMServer(str(tiny_model_dir))
    cmd = plain.command()
    assert cmd[cmd.index("--dtype") + 1] == "float32" and plain.requested_dtype == "auto"
    assert VLLMServer(str(tiny_model_dir), dtype="bfloat16").dtype == "bfloat16"
    # A checkpoint stored in bf16 is served as vLLM decides.
    stored_bf16 = tmp_path / "bf16"
    shutil.copytree(tiny_model_dir, stored_bf16)
    config = json.loads((stored_bf16 / "config.json").read_text())
    config.pop("torch_dtype", None)
    (stored_bf16 / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert VLLMServer(str(stored_bf16)).dtype == "auto"
    # With bf16 instructions, or a GPU, vLLM's own `auto` stands.
    monkeypatch.setattr(environment, "cpu_has_native_bf16", lambda: True)
    assert VLLMServer(str(tiny_model_dir)).dtype == "auto"
    monkeypatch.setattr(environment, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(environment, "has_gpu", lambda: True)
    assert VLLMServer(str(tiny_model_dir)).dtype == "auto"


def test_draft_length_defaults_to_the_drafters_generation_config(
    monkeypatch, tmp_path, tiny_model_dir, tiny_drafter_dir
):
    with pytest.raises(ValueError, match="pass num_draft_tokens"):
        VLLMServer(str(tiny_model_dir), drafter=str(tiny_drafter_dir))
    exported = shutil.copytree(tiny_drafter_dir, tmp_path / "exported")
    generation = json.loads((exported / "generation_config.json").read_text())
    generation["num_assistant_tokens"] = 5
    (exported / "generation_config.json").write_text(json.dumps(generation))
    server = VLLMServer(str(tiny_model_dir), drafter=str(exported))
    assert server.speculative_config["num_speculative_tokens"] == 5


def test_serve_config_validation_and_curl_example():
    with pytest.raises(ValueError, match="only allowed with a drafter"):
        ServeConfig(target="t", num_draft_tokens=3)
    with pytest.raises(ValueError, match="less than 65536"):
        ServeConfig(target="t", port=70000)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        ServeConfig(target="t", draft="d")
    example = curl_example("http://127.0.0.1:8000", "my model")
    assert example.startswith("curl http://127.0.0.1:8000/v1/chat/completions")
    body = json.loads(example.split(" -d ", 1)[1].strip("'"))
    assert body["model"] == "my model" and body["messages"][0]["role"] == "user"
