"""The benchmark script runs end to end in quick mode and writes a complete table."""

from __future__ import annotations

import re

import pytest

from benchmarks.bench import METRICS, main


@pytest.mark.slow
def test_quick_benchmark_writes_every_metric(tmp_path):
    out = tmp_path / "results.md"
    assert main(["--quick", "--out", str(out)]) == 0
    table = out.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    models = {row.split("|")[1].strip() for row in rows[1:]}
    assert models == {"mlp_input_bn", "encoder_decoder"}
    metric_names = [row.split("|")[2].strip() for row in rows[1:]]
    for metric in METRICS:
        assert any(name.startswith(metric) for name in metric_names), metric
    for row in rows[1:]:
        ours = row.split("|")[3].strip()
        assert re.fullmatch(r"[-+0-9.e]+", ours), row
