"""What the network publishes and who is asking: catalog, tables,
studies, nodes, whoami, and the low-level action call."""

from __future__ import annotations

import polars as pl
import pytest

import confer


def test_whoami(client: confer.Client) -> None:
    me = client.whoami()
    assert me.name == "researcher" and me.role == "researcher"
    assert me.created is not None and me.revoked is None


def test_catalog_publishes_schemas_never_counts(client: confer.Client) -> None:
    catalog = client.catalog()
    assert catalog.sites == ["site-a", "site-b", "site-c"] and catalog.missing_sites == []
    person = catalog.table("person")
    assert person.private and person.privacy_unit == "person_id" and person.one_row_per_unit
    assert person.sites == ["site-a", "site-b", "site-c"]
    gender = person.column("gender_concept_id")
    assert gender.type == "int64"
    assert gender.domain is not None and len(gender.domain) == 2
    concept = catalog.table("concept")
    assert not concept.private
    with pytest.raises(KeyError, match="not in the network catalog"):
        catalog.table("persons")
    columns = catalog.to_polars()
    assert columns.columns == [
        "table",
        "column",
        "type",
        "privacy_unit",
        "bounds_low",
        "bounds_high",
        "domain_size",
        "domain",
    ]
    units = columns.filter(pl.col("privacy_unit"))
    assert set(units["column"].to_list()) == {"person_id"}
    # Nothing in the catalog counts rows.
    assert not any("count" in c or "rows" in c for c in columns.columns)


def test_tables(client: confer.Client) -> None:
    tables = client.tables()
    assert tables.columns == ["table", "private", "privacy_unit", "one_row_per_unit", "columns", "sites"]
    names = tables["table"].to_list()
    assert {"person", "condition_occurrence", "drug_exposure", "concept"} <= set(names)
    assert names == sorted(names)
    row = tables.filter(pl.col("table") == "person").row(0, named=True)
    assert row["private"] and row["privacy_unit"] == "person_id" and row["columns"] > 5
    assert row["sites"] == ["site-a", "site-b", "site-c"]


def test_studies_and_one_study(client: confer.Client) -> None:
    studies = client.studies()
    assert studies["name"].to_list() == ["demo"]
    assert studies["members"].to_list() == [["researcher"]]
    assert studies["requested_epsilon"][0] == pytest.approx(50.0)
    study = client.study_info()
    assert study.name == "demo" and study.principal_investigator == "researcher"
    assert study == client.study_info("demo")


def test_nodes(client: confer.Client) -> None:
    nodes = client.nodes()
    assert nodes["name"].to_list() == ["site-a", "site-b", "site-c"]
    assert nodes["healthy"].all()
    assert nodes["url"].str.starts_with("http://127.0.0.1:").all()


def test_jobs_listing_has_its_columns(client: confer.Client) -> None:
    jobs = client.jobs()
    assert jobs.columns == [
        "job_id",
        "name",
        "study",
        "state",
        "round",
        "rounds",
        "owner",
        "created",
        "updated",
        "error",
    ]


def test_raw_actions_and_the_admin_role(network: confer.LocalNetwork, client: confer.Client) -> None:
    assert client.action("confer.whoami")["name"] == "researcher"
    with pytest.raises(confer.PermissionDeniedError, match="admin role") as denied:
        client.action("confer.user.list")
    assert isinstance(denied.value, confer.AuthError) and isinstance(denied.value, confer.RefusedError)
    assert denied.value.code == "PERMISSION_DENIED" and not denied.value.retryable
    admin = network.connect("admin")
    assert admin.whoami().role == "admin"
    users = admin.action("confer.user.list")
    assert {u["name"] for u in users} >= {"admin", "researcher"}


def test_client_is_a_context_manager(network: confer.LocalNetwork) -> None:
    with confer.connect(network.url, token=network.token, study=network.study) as c:
        assert not c.closed
        assert "study='demo'" in repr(c)
    assert c.closed
    c.close()  # idempotent
    with pytest.raises(confer.ConfigurationError, match="closed"):
        c.whoami()
