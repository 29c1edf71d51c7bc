"""The protocol benchmark runs end to end on a small group and reports consistent numbers."""
from __future__ import annotations

import json

from benchmarks.cli import main


def test_protocol_bench_writes_results(tmp_path):
    assert main(["protocol", "--shape", "2x32x32x3", "--groups", "20", "--repeats", "1",
                 "--transports", "ipc", "--output", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "protocol.json").read_text())
    methods = data["results"]["transports"]["ipc"]["methods"]
    assert set(methods) == {"protocol", "bare", "bare+copy", "pickle"}
    for run in methods.values():
        assert run["groups_per_s"] > 0
        assert abs(run["gb_per_s"] * 1e9 - run["groups_per_s"] * 2 * 32 * 32 * 3) / (run["gb_per_s"] * 1e9) < 1e-6
    assert (tmp_path / "protocol.png").stat().st_size > 0
    assert "protocol/bare" in (tmp_path / "protocol.txt").read_text()
