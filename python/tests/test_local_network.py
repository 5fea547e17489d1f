"""local_network(): finding the binary, and clear failures (with the
processes' output) instead of hangs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import confer


def test_the_network_serves_and_knows_its_users(network: confer.LocalNetwork) -> None:
    assert network.dataset == "gibleed"
    assert network.url.startswith("http://127.0.0.1:") and network.address == network.url[len("http://") :]
    assert network.token.startswith("cft_") and network.admin_token.startswith("cft_")
    assert network.study == "demo" and network.sites == ["site-a", "site-b", "site-c"]
    assert network.client is network.client
    assert "Press Ctrl-C to stop." in network.output()
    with pytest.raises(confer.LocalNetworkError, match="no user nobody"):
        network.connect("nobody")


def test_find_binary_honours_confer_bin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = confer.find_binary()
    assert real.is_file()
    monkeypatch.setenv("CONFER_BIN", str(real))
    assert confer.find_binary() == real
    with pytest.raises(confer.LocalNetworkError, match="does not exist"):
        confer.find_binary(tmp_path / "confer")


def test_a_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONFER_BIN", str(tmp_path / "nope"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CARGO_TARGET_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import confer.local as local

    monkeypatch.setattr(local, "_repo_roots", lambda: [])
    with pytest.raises(confer.LocalNetworkError, match="cannot find the confer binary") as err:
        with confer.local_network():
            pass
    assert "make build" in str(err.value) and "CONFER_BIN" in str(err.value)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(confer.LocalNetworkError, match="unknown dataset"):
        with confer.local_network("mimic"):
            pass
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(confer.LocalNetworkError, match="not empty"):
        with confer.local_network(work_dir=tmp_path / "busy"):
            pass
    with pytest.raises(confer.LocalNetworkError, match="holds no PERSON.csv"):
        with confer.local_network(data_dir=tmp_path):
            pass


def test_a_federation_that_does_not_come_up_in_time_is_stopped(tmp_path: Path) -> None:
    with pytest.raises(confer.LocalNetworkError, match="did not start in time") as err:
        with confer.local_network(timeout=1.5, work_dir=tmp_path / "w"):
            pass
    # The message holds what confer printed so far.
    assert "confer demo" in str(err.value)


def test_a_failing_start_shows_the_output(tmp_path: Path) -> None:
    broken = tmp_path / "data"
    broken.mkdir()
    (broken / "PERSON.csv").write_text("not,the,gibleed,header\n")
    with pytest.raises(confer.LocalNetworkError, match="exited with status") as err:
        with confer.local_network(data_dir=broken, timeout=60):
            pass
    assert "error" in str(err.value).lower()


def test_an_error_in_the_block_still_stops_the_network(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError):
        with confer.local_network("heart", work_dir=tmp_path / "heart", timeout=120) as net:
            pids = [c.proc.pid for c in net._children]
            assert net.client.nodes()["healthy"].all()
            raise ZeroDivisionError
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
