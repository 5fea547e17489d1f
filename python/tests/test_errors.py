"""Bad input raises a ConferError subclass with confer's message and the
retry hint; nothing hangs."""

from __future__ import annotations

import socket
import time

import pytest

import confer
from confer.errors import error_for, from_adbc

DP_COUNT = (
    "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.0, delta = 1e-6) "
    "gender_concept_id, COUNT(*) AS persons FROM person GROUP BY gender_concept_id "
    "ORDER BY gender_concept_id"
)


def test_a_wrong_token(network: confer.LocalNetwork) -> None:
    with pytest.raises(confer.AuthenticationError) as err:
        confer.connect(network.url, token="cft_not_a_token", study=network.study)
    assert "token is unknown or revoked" in str(err.value)
    assert err.value.code == "UNAUTHENTICATED" and not err.value.retryable
    assert isinstance(err.value, confer.AuthError)
    # Without the eager check, the first query fails the same way.
    client = confer.connect(network.url, token="cft_not_a_token", study=network.study, verify=False)
    with client, pytest.raises(confer.AuthenticationError, match="unknown or revoked"):
        client.sql(DP_COUNT)


def test_no_token(network: confer.LocalNetwork, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONFER_TOKEN", raising=False)
    with pytest.raises(confer.AuthenticationError, match="no credentials"):
        confer.connect(network.url)


def test_an_unknown_study(network: confer.LocalNetwork, client: confer.Client) -> None:
    with pytest.raises(confer.NotFoundError) as err:
        client.sql(DP_COUNT, study="nope")
    assert str(err.value).startswith("study nope does not exist")
    assert isinstance(err.value, confer.RefusedError) and not err.value.retryable
    with pytest.raises(confer.NotFoundError, match="study nope does not exist"):
        client.study_info("nope")
    other = confer.connect(network.url, token=network.token, study="nope")
    with other, pytest.raises(confer.NotFoundError):
        other.budget()


def test_a_refused_query_says_what_to_change(client: confer.Client) -> None:
    with pytest.raises(confer.RefusedError) as err:
        client.sql("SELECT person_id, year_of_birth FROM person")
    message = str(err.value)
    assert message.startswith("this query reads person-level data and needs the DP clause")
    # The driver's decoration is gone: confer's words only.
    assert "[FlightSQL]" not in message and "InvalidArgument" not in message
    assert err.value.code == "INVALID_ARGUMENT" and not err.value.retryable


def test_an_unknown_table_carries_the_reason(client: confer.Client) -> None:
    with pytest.raises(confer.RefusedError) as err:
        client.sql(DP_COUNT.replace("FROM person", "FROM persons"))
    assert "table persons is not in the network catalog" in str(err.value)
    assert err.value.reason == "not_in_catalog"


def test_over_the_per_query_cap_is_a_budget_error(client: confer.Client) -> None:
    before = client.budget()["spent_rho"].to_list()
    with pytest.raises(confer.BudgetError) as err:
        client.sql(DP_COUNT.replace("epsilon = 1.0", "epsilon = 100"))
    message = str(err.value)
    assert "nothing spent" in message and "per-task cap" in message
    assert "Vendor code" not in message and "ResourceExhausted" not in message
    assert err.value.code == "RESOURCE_EXHAUSTED" and not err.value.retryable
    assert client.budget()["spent_rho"].to_list() == before


def test_explain_of_a_bad_query_is_refused(client: confer.Client) -> None:
    with pytest.raises(confer.RefusedError, match="needs epsilon"):
        client.explain("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (delta = 1e-6) COUNT(*) AS n FROM person")


def test_nothing_listening_is_unavailable_and_retryable() -> None:
    start = time.monotonic()
    with pytest.raises(confer.UnavailableError) as err:
        confer.connect("http://127.0.0.1:1", token="x", timeout=5)
    assert "cannot reach the coordinator" in str(err.value)
    assert err.value.retryable
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("", "empty"),
        ("not a url", "not a valid coordinator URL"),
        ("ftp://127.0.0.1:50051", "not a coordinator URL"),
        ("http://127.0.0.1", "needs a host and a port"),
        ("http://127.0.0.1:99999", "not a valid coordinator URL"),
        ("http://127.0.0.1:5/path", "has a path"),
    ],
)
def test_a_malformed_url(url: str, words: str) -> None:
    with pytest.raises(confer.ConfigurationError, match=words) as err:
        confer.connect(url, token="x")
    assert isinstance(err.value, ValueError)


def test_a_token_never_travels_in_plaintext_beyond_this_machine() -> None:
    for url in ("http://10.1.2.3:50051", "coordinator.example:50051"):
        with pytest.raises(confer.ConfigurationError, match="plaintext"):
            confer.connect(url, token="secret", verify=False)
    for url in ("http://localhost:1", "http://[::1]:1", "grpc://127.0.0.1:1"):
        confer.connect(url, token="secret", verify=False).close()


def test_tls_files_are_checked(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(confer.ConfigurationError, match="cannot read the CA certificate"):
        confer.connect("https://127.0.0.1:1", token="x", ca=tmp_path / "missing.pem", verify=False)
    with pytest.raises(confer.ConfigurationError, match="both cert= and key="):
        confer.connect("https://127.0.0.1:1", cert=tmp_path / "c.pem", verify=False)


def test_every_call_has_a_timeout(network: confer.LocalNetwork) -> None:
    # A server that accepts the connection and never answers: the call
    # gives up at its timeout instead of hanging.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        with pytest.raises(confer.DeadlineExceededError) as err:
            confer.connect(f"http://127.0.0.1:{port}", token=network.token, timeout=0.5)
    assert "within 0.5 s" in str(err.value) and err.value.retryable
    slow = confer.connect(network.url, token=network.token, study=network.study, timeout=0.0001, verify=False)
    with slow, pytest.raises(confer.DeadlineExceededError, match="within 0.0001 s"):
        slow.sql(DP_COUNT)
    with pytest.raises(confer.ConfigurationError, match="timeout"):
        confer.connect(network.url, token=network.token, timeout=0)


def test_status_metadata_decides_the_class_and_retry_hint() -> None:
    err = error_for("INTERNAL", "restarting", {"confer-retryable": "true", "confer-site": "site-b"})
    assert isinstance(err, confer.InternalError) and err.retryable and err.site == "site-b"
    assert error_for("UNAVAILABLE", "down").retryable
    assert not error_for("UNAVAILABLE", "down", {"confer-retryable": "false"}).retryable
    assert isinstance(error_for("RESOURCE_EXHAUSTED", "budget"), confer.BudgetError)
    assert isinstance(error_for("DEADLINE_EXCEEDED", "slow"), confer.UnavailableError)
    assert isinstance(error_for("UNIMPLEMENTED", "old"), confer.InternalError)
    assert "retryable=True" in repr(err)


def test_adbc_messages_lose_the_driver_decoration() -> None:
    class Fake(Exception):
        status_code = 9
        vendor_code = 8
        details = [(b"confer-retryable", b"false"), (b"confer-site", b"site-a")]

    err = from_adbc(
        Fake(
            "INTERNAL: [FlightSQL] refused before any node ran it, nothing spent "
            "(ResourceExhausted; ReadPartition(DoGet)). Vendor code: 8"
        )
    )
    assert isinstance(err, confer.BudgetError)
    assert err.message == "refused before any node ran it, nothing spent"
    assert err.site == "site-a" and not err.retryable
