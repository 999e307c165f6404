"""`sd2 eval --backend onnxruntime`: the target and the drafters exported to ONNX by optimum and
run by ONNX Runtime on CPU, with transformers' assisted generation on top.

optimum-onnx (the exporter and `ORTModelForCausalLM`) needs transformers < 4.58, so it lives in
its own environment (`.venv-onnx`, made by `make setup`) and runs as a worker process
(`sd2_hf/evaluation/onnx_worker.py`) that this backend talks to over JSON lines. Exports are
fp32 (ONNX Runtime's CPU kernels are fp32) and cached under the evaluation's output directory,
one per checkpoint. Acceptance is counted exactly as in the transformers backend, from each
verification step's drafted and committed tokens (`counters_from_steps`).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sd2_hf.evaluation.backend import (
    Decode,
    DrafterPlan,
    Generate,
    Generation,
    counters_from_steps,
)
from sd2_hf.evaluation.config import EvalConfig
from sd2_hf.evaluation.cost_model import verify_ratios
from sd2_hf.utils.io import checkpoint_identity

WORKER = Path(__file__).with_name("onnx_worker.py")


class OnnxWorker:
    """The worker process: one JSON request per line in, one reply per line out; its stderr
    (export and ONNX Runtime logs) goes to `log`."""

    def __init__(self, log: Path):
        from sd2_hf.utils.environment import onnx_python

        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = log.open("a")
        self.process = subprocess.Popen(
            [str(onnx_python()), str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.log = log
        weakref.finalize(self, _stop, self.process, self._log)

    def call(self, op: str, **request: Any) -> dict[str, Any]:
        self.process.stdin.write(json.dumps({"op": op, **request}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(
                f"the ONNX Runtime worker exited during `{op}` (status {self.process.poll()}); "
                f"its log: {self.log}"
            )
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise RuntimeError(f"ONNX Runtime worker, `{op}`: {reply['error']} (log: {self.log})")
        return reply


def _stop(process: subprocess.Popen, log) -> None:
    if process.poll() is None:
        process.stdin.close()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    log.close()


def _export_key(path: str) -> str:
    """One export per checkpoint: a hash of its identity (resolved path, its files' sizes and
    times), the one the evaluation journal keys its rows by."""
    identity = json.dumps(checkpoint_identity(path), sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


class OnnxRuntimeBackend:
    """Target loaded in the worker for the whole evaluation; drafters one at a time."""

    name = "onnxruntime"

    def __init__(self, config: EvalConfig, target_path: str, output: Path):
        self.config = config
        self.exports = output / "onnx"
        self.worker = OnnxWorker(output / "logs" / "onnx-worker.log")
        self.worker.call("load", role="target", path=self.exported(target_path))

    def exported(self, path: str) -> str:
        """The ONNX export of checkpoint `path`, made once (into the evaluation's output)."""
        dst = self.exports / _export_key(path)
        if not (dst / "config.json").is_file():
            print(f"exporting {path} to ONNX (fp32, once): {dst}", flush=True)
            self.worker.call("export", src=str(Path(path).resolve()), dst=str(dst))
        return str(dst)

    def _load_drafter(self, drafter: DrafterPlan) -> None:
        if drafter.kind != "model" or drafter.uag:
            raise ValueError(
                f"backend onnxruntime: drafter {drafter.name!r} is not a same-tokenizer model "
                "drafter (n-gram and UAG drafters run on the transformers backend)"
            )
        path = self.exported(drafter.path)
        self.worker.call("load", role="drafter", path=path, k=self.config.num_draft_tokens)

    def versions(self) -> dict[str, str]:
        return self.worker.call("versions")

    @contextmanager
    def session(self, drafter: DrafterPlan | None) -> Iterator[Generate]:
        if drafter is not None:
            self._load_drafter(drafter)

        def generate(prompt_ids: list[int]) -> Generation:
            reply = self.worker.call(
                "generate",
                ids=prompt_ids,
                max_new_tokens=self.config.max_new_tokens,
                assisted=drafter is not None,
            )
            if drafter is None:
                return Generation(reply["token_ids"], reply["seconds"])
            return Generation(
                reply["token_ids"],
                reply["seconds"],
                counters=counters_from_steps(reply["steps"]),
                target_steps=len(reply["steps"]),
            )

        yield generate

    def verify_ratios(self, runs: list[tuple[list[int], int]], ks: list[int]) -> dict[int, float]:
        """The target's verify step over K + 1 tokens / its one-token step, timed in the worker
        (`sd2_hf.evaluation.cost_model.verify_ratios`)."""

        def forward_seconds(prompt_ids: list[int], widths: list[int]) -> dict[int, float]:
            reply = self.worker.call("forward_seconds", ids=prompt_ids, widths=widths)
            return {int(w): s for w, s in reply["seconds"].items()}

        return verify_ratios(forward_seconds, runs, ks)

    @contextmanager
    def decoder(self, drafter: DrafterPlan | None) -> Iterator[Decode]:
        if drafter is not None:
            self._load_drafter(drafter)
        role = "target" if drafter is None else "drafter"

        def decode(prompt_ids: list[int], n: int) -> tuple[float, int]:
            reply = self.worker.call("decode", role=role, ids=prompt_ids, n=n)
            return reply["seconds"], reply["tokens"]

        yield decode
