"""`sd2 push`: upload an export directory to the Hugging Face Hub.

The token comes from `HF_TOKEN` or the user's `hf auth login`, through huggingface_hub's own
lookup; it is never passed through this module's output or logs. The Hub endpoint is
huggingface_hub's (`HF_ENDPOINT` to point it elsewhere).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sd2_hf.utils.io import atomic_write_json, atomic_write_text, read_json

logger = logging.getLogger(__name__)


class PushConfig(BaseModel):
    """Upload an exported drafter (or any model directory) to a Hub model repo."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="export directory to upload (from `sd2 export`)")
    repo_id: str = Field(description="Hub model repo, `ORG/NAME` (created if missing)")
    private: bool = Field(False, description="create the repo as private")
    revision: str | None = Field(
        None, description="branch to push to (created from main if missing; default: main)"
    )
    commit_message: str | None = Field(
        None, description="commit message (default: `Upload SD² drafter`)"
    )
    render_card: bool = Field(
        True,
        description="re-render README.md from sd2_drafter.json so the usage snippets name "
        "--repo-id (export directories only)",
    )

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]", value) or ".." in value:
            raise ValueError(
                f"repo_id must look like ORG/NAME (letters, digits, '-', '_', '.'), got {value!r}"
            )
        return value


@dataclass
class PushResult:
    repo_url: str
    commit_url: str
    revision: str
    files: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_push(config: PushConfig) -> PushResult:
    """Create the repo if needed and upload every file of `config.path` in one commit."""
    from huggingface_hub import HfApi, get_token

    from sd2_hf.export.card import render_model_card
    from sd2_hf.export.export import METADATA_FILE

    folder = Path(config.path).expanduser()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} is not a model directory (no config.json): pass the output of `sd2 export`"
        )
    if get_token() is None:
        raise PermissionError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)"
        )
    metadata_path = folder / METADATA_FILE
    if config.render_card and metadata_path.is_file():
        metadata = read_json(metadata_path)
        metadata["card"]["repo_id"] = config.repo_id
        card = str(render_model_card(metadata, repo_id=config.repo_id))
        atomic_write_text(folder / "README.md", card.rstrip("\n") + "\n")
        atomic_write_json(metadata_path, metadata)

    api = HfApi()
    repo_url = api.create_repo(
        config.repo_id, repo_type="model", private=config.private, exist_ok=True
    )
    revision = config.revision or "main"
    if revision != "main":
        api.create_branch(config.repo_id, branch=revision, repo_type="model", exist_ok=True)
    files = sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and not _hidden(p, folder)
    )
    commit = api.upload_folder(
        repo_id=config.repo_id,
        folder_path=folder,
        repo_type="model",
        revision=revision,
        commit_message=config.commit_message or "Upload SD² drafter",
        ignore_patterns=[".*", "**/.*"],
    )
    result = PushResult(
        repo_url=str(repo_url), commit_url=commit.commit_url, revision=revision, files=files
    )
    print(
        f"pushed {len(files)} files to {config.repo_id} ({revision})\n"
        f"  repo    {result.repo_url}\n  commit  {result.commit_url}"
    )
    return result


def _hidden(path: Path, root: Path) -> bool:
    # Staging and lock files of atomic writes start with a dot; they are never uploaded.
    return any(part.startswith(".") for part in path.relative_to(root).parts)
