"""The real-engine benchmark as the docs show it (``scripts/bench --real``), in its quick
form, on the tier's running cluster (``--attach``: no second cluster start). ``scripts/demo
--real`` starts its own cluster in tests/docs, as a user's first run does."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from vllm_harness import ROOT, RealCluster

pytestmark = pytest.mark.vllm
ENV = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def test_bench_real_quick(cluster: RealCluster, tmp_path: Path) -> None:
    config = tmp_path / "kvgate-real.yaml"
    config.write_text(yaml.safe_dump(cluster.config))
    got = subprocess.run(
        ["scripts/bench", "--real", "--attach", str(config), "--quick", "--routers",
         "round_robin,kvgate", "--capacity-seconds", "2", "--out", str(tmp_path / "out")],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-2000:]
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert {r["router"] for r in runs} == {"round_robin", "kvgate"}
    assert all(r["failed"] == 0 and r["requests"] > 0 for r in runs)
    kvgate = next(r for r in runs if r["router"] == "kvgate")
    assert kvgate["hit_ratio"] > 0  # the real engines reported cached tokens
    assert cluster.proc.poll() is None  # attached, not stopped


def test_attach_wants_a_config_and_real() -> None:
    got = subprocess.run(["scripts/bench", "--attach", "/nonexistent.yaml"], cwd=ROOT,
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert got.returncode == 2 and "--attach takes the config file" in got.stderr
