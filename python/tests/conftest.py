"""Real federations for the confer package's tests, one of each per session:

* ``network``: ``confer.local_network()`` (``confer demo --serve`` over
  GiBleed, three sites, study ``demo``);
* ``heart``: ``confer.local_network("heart")`` (the four UCI
  heart-disease hospitals, training allowed), started only for the
  training tests.

The binary comes from ``CONFER_BIN`` (``make test-python`` sets it), else
``confer`` on PATH, else the cargo target directory.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import confer


@pytest.fixture(scope="session")
def network() -> Iterator[confer.LocalNetwork]:
    with confer.local_network(timeout=240) as net:
        yield net


@pytest.fixture(scope="session")
def client(network: confer.LocalNetwork) -> confer.Client:
    return network.client


@pytest.fixture(scope="session")
def heart() -> Iterator[confer.LocalNetwork]:
    with confer.local_network("heart", timeout=120) as net:
        yield net
