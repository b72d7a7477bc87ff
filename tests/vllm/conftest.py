"""The real-vLLM tier (marker ``vllm``): real vLLM (CPU) engines with LMCache, the real
LMCache controller, kvgate in a real mitmdump in front. Needs ``.venv-vllm``
(``scripts/vllm-cluster --install-only``, which ``scripts/test`` runs); run just this tier
with ``scripts/test -m vllm tests/vllm``.

One cluster serves the whole tier (it takes about a minute to start). The tests that kill
or restart part of it run last, and leave it whole again.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vllm_harness import Gateway, RealCluster, gateway_config, run_cluster, start_gateway

DISRUPTIVE = "test_real_vllm_faults.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Fault tests (an engine killed, the controller restarted) after everything else, so
    that a failure there cannot take the others with it."""
    items.sort(key=lambda item: item.path.name == DISRUPTIVE)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    yield from run_cluster(tmp_path_factory.mktemp("vllm-cluster"))


@pytest.fixture(scope="module")
def gateway(cluster: RealCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("gateway"), gateway_config(cluster))
    yield gw
    gw.stop()
