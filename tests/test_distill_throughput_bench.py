"""bench/distill_throughput.py records what it knows about the machine, and a note only as given
(it used to write a fixed "shared machine" note into every result, whatever the run was)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import tiny

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "distill_throughput.py"


@pytest.fixture(scope="module")
def bench():
    return tiny.load_script(SCRIPT)


def test_the_machine_note_is_recorded_only_as_given(bench):
    plain = bench.machine(None)
    assert plain["cpus"] == os.cpu_count() and "note" not in plain
    assert "shared" not in bench.machine_line(plain)
    noted = bench.machine("alone on the machine")
    assert noted["note"] == "alone on the machine"
    assert bench.machine_line(noted).endswith("Note: alone on the machine")


def test_the_committed_result_does_not_claim_a_shared_machine():
    """The README records the committed run as alone on the machine."""
    report = json.loads((ROOT / "bench" / "results" / "distill_throughput.json").read_text())
    assert not report["machine"].get("note", "").startswith("shared machine")
    text = (ROOT / "bench" / "results" / "distill_throughput.md").read_text()
    assert "shared with other jobs during the run" not in text
