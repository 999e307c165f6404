"""`sd2 push` against a local stand-in for the Hub API (127.0.0.1), run as a user runs it.

The stand-in implements what `create_repo`, `create_branch` and `upload_folder` call: repo
creation, README metadata validation, `preupload` (every file answered "regular", so no LFS or
Xet transfer) and the NDJSON `commit`. It records every request so the test can check what
arrived and that the token went only into the Authorization header.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sd2_hf.export.export import ExportConfig, run_export

TOKEN = "hf_sd2TestTokenThatMustNeverBePrinted0123"


class FakeHub(BaseHTTPRequestHandler):
    requests: list[dict] = []
    files: dict[str, dict[str, bytes]] = {}

    def log_message(self, *args):  # keep the test output quiet
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 (http.server API)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        parts = self.path.split("?")[0].strip("/").split("/")
        self.requests.append(
            {
                "method": "POST",
                "path": self.path,
                "auth": self.headers.get("Authorization"),
                "body": body,
            }
        )
        endpoint = f"http://{self.headers['Host']}"
        if parts[:3] == ["api", "repos", "create"]:
            payload = json.loads(body)
            return self._reply(
                200, {"url": f"{endpoint}/{payload['organization']}/{payload['name']}"}
            )
        if parts[:2] == ["api", "validate-yaml"]:
            return self._reply(200, {})
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo, action, revision = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
            if action == "branch":
                return self._reply(200, {})
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._reply(
                    200,
                    {
                        "files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                            for f in files
                        ]
                    },
                )
            if action == "commit":
                received = self.files.setdefault(f"{repo}@{revision}", {})
                for line in body.splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        value = item["value"]
                        received[value["path"]] = base64.b64decode(value["content"])
                return self._reply(
                    200,
                    {
                        "commitUrl": f"{endpoint}/{repo}/commit/{'0' * 40}",
                        "commitOid": "0" * 40,
                        "pullRequestUrl": None,
                    },
                )
        return self._reply(404, {"error": f"unexpected {self.path}"})

    def do_GET(self):  # noqa: N802
        self.requests.append(
            {"method": "GET", "path": self.path, "auth": self.headers.get("Authorization")}
        )
        self._reply(404, {"error": f"unexpected GET {self.path}"})


@pytest.fixture()
def fake_hub():
    FakeHub.requests, FakeHub.files = [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_drafter_dir, tiny_model_dir):
    out = tmp_path_factory.mktemp("push") / "export"
    run_export(
        ExportConfig(drafter=str(tiny_drafter_dir), output=str(out), target=str(tiny_model_dir))
    )
    return out


def _push(
    args: list[str], endpoint: str, home: Path, token: str | None = TOKEN, verbose: bool = True
):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    # huggingface_hub reads HF_ENDPOINT when it is imported: set it for the new process.
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_XET="1")
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "sd2_hf.cli", *(["-v"] if verbose else []), "push", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_push_uploads_the_export_and_never_shows_the_token(fake_hub, export_dir, tmp_path):
    result = _push(
        [str(export_dir), "--repo-id", "sd2-org/tiny-drafter", "--private", "--revision", "v1"],
        fake_hub,
        tmp_path / "hf-home",
    )
    assert result.returncode == 0, result.stderr
    # Every file of the export arrived, byte for byte, on the requested branch.
    local = {
        str(p.relative_to(export_dir)): p.read_bytes() for p in export_dir.rglob("*") if p.is_file()
    }
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md",
            "sd2_drafter.json", "tokenizer.json"} <= set(local)  # fmt: skip
    assert FakeHub.files == {"sd2-org/tiny-drafter@v1": local}
    create = next(r for r in FakeHub.requests if r["path"] == "/api/repos/create")
    assert json.loads(create["body"]) == {
        "name": "tiny-drafter",
        "organization": "sd2-org",
        "visibility": "private",
        "type": "model",
    }
    assert any(r["path"] == "/api/models/sd2-org/tiny-drafter/branch/v1" for r in FakeHub.requests)
    # The card was re-rendered for the repo it was pushed to.
    assert 'from_pretrained("sd2-org/tiny-drafter")' in local["README.md"].decode()
    # The token was used for every API call (Authorization header) and appears nowhere in
    # the output. (huggingface_hub also GETs /api/agent-harnesses, unauthenticated.)
    posts = [r for r in FakeHub.requests if r["method"] == "POST"]
    assert [r["path"] for r in posts if r["auth"] != f"Bearer {TOKEN}"] == []
    assert {r["path"] for r in posts} == {
        "/api/repos/create",
        "/api/models/sd2-org/tiny-drafter/branch/v1",
        "/api/validate-yaml",
        "/api/models/sd2-org/tiny-drafter/preupload/v1",
        "/api/models/sd2-org/tiny-drafter/commit/v1",
    }
    assert "pushed" in result.stdout and "sd2-org/tiny-drafter" in result.stdout
    for text in (result.stdout, result.stderr):
        assert TOKEN not in text and TOKEN[3:15] not in text


def test_push_without_a_token_says_how_to_log_in(fake_hub, export_dir, tmp_path):
    result = _push(
        [str(export_dir), "--repo-id", "sd2-org/tiny-drafter"],
        fake_hub,
        tmp_path / "hf-home",
        token=None,
        verbose=False,  # -v adds the traceback to the message
    )
    assert result.returncode == 2
    assert "HF_TOKEN" in result.stderr and "hf auth login" in result.stderr
    assert "Traceback" not in result.stderr
    assert [r for r in FakeHub.requests if r["method"] == "POST"] == []


def test_push_rejects_a_bad_repo_id(export_dir, tmp_path):
    result = _push([str(export_dir), "--repo-id", "no-slash"], "http://127.0.0.1:9", tmp_path)
    assert result.returncode != 0 and "ORG/NAME" in result.stderr
