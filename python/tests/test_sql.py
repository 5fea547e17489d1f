"""DP SQL through the client: results with intervals and release metadata,
EXPLAIN PRIVACY, SHOW PRIVACY BUDGET. Only what DP allows is asserted:
names, shapes, interval ordering, costs, never exact noisy values."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pytest

import confer

DP_COUNT = (
    "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.0, delta = 1e-6) "
    "gender_concept_id, COUNT(*) AS persons FROM person GROUP BY gender_concept_id "
    "ORDER BY gender_concept_id"
)


def test_sql_returns_values_with_intervals_and_the_release(client: confer.Client) -> None:
    result = client.sql(DP_COUNT)
    assert isinstance(result, confer.QueryResult)
    df = result.df
    assert isinstance(df, pl.DataFrame)
    assert df.columns == ["gender_concept_id", "persons", "persons_ci_low", "persons_ci_high"]
    assert df.shape == (2, 4) == result.shape and len(result) == 2
    assert df["gender_concept_id"].to_list() == [8507, 8532]  # a public domain: exact keys
    assert df.schema["persons"] == pl.Int64 and df.schema["persons_ci_low"] == pl.Float64
    assert (df["persons_ci_low"] < df["persons"]).all()
    assert (df["persons"] < df["persons_ci_high"]).all()
    assert isinstance(result.arrow, pa.Table) and b"confer.result" in result.arrow.schema.metadata

    release = result.release
    assert release is not None
    assert release.sites == ["site-a", "site-b", "site-c"] and release.sites_answered == 3
    assert release.missing_sites == []
    assert release.mechanism == "gaussian"
    assert release.confidence == pytest.approx(0.95)
    assert release.cost_per_site.epsilon == pytest.approx(1.0)
    assert release.cost_per_site.delta == pytest.approx(1e-6)
    assert release.cost_per_site.rho > 0
    persons = release.columns["persons"]
    assert persons.interval == ("persons_ci_low", "persons_ci_high")
    assert persons.noise_stddev is not None and persons.noise_stddev > 0
    assert release.value_columns == ["persons"]
    assert "Cost at each site: epsilon = 1.0000" in release.summary()
    assert "site-a, site-b, site-c" in repr(result)
    assert "<table" in result._repr_html_()


def test_intervals_in_long_form_for_plots(client: confer.Client) -> None:
    long = client.sql(
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.0, delta = 1e-6) "
        "COUNT(*) AS persons, SUM(year_of_birth, contribution_bounds_per_group => (1900, 2020)) AS total "
        "FROM person"
    ).intervals()
    assert long.columns == ["column", "value", "ci_low", "ci_high"]
    assert sorted(long["column"].to_list()) == ["persons", "total"]
    assert (long["ci_low"] <= long["value"]).all() and (long["value"] <= long["ci_high"]).all()


def test_laplace_release_is_pure_dp(client: confer.Client) -> None:
    result = client.sql(
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.0, mechanism = 'laplace', "
        "max_rows_contributed = 3) visit_concept_id, COUNT(*) AS visits FROM visit_occurrence "
        "GROUP BY visit_concept_id"
    )
    assert result.release is not None
    assert result.release.mechanism == "laplace"
    assert result.release.cost_per_site.delta == 0
    assert "pure DP" in str(result.release.cost_per_site)
    assert {"visits", "visits_ci_low", "visits_ci_high"} <= set(result.columns)


def test_a_public_query_is_no_release(client: confer.Client) -> None:
    result = client.sql("SELECT COUNT(*) AS concepts FROM concept")
    assert result.release is None
    assert result.columns == ["site", "concepts"]
    assert result.df["site"].to_list() == ["site-a", "site-b", "site-c"]
    with pytest.raises(confer.InternalError, match="not a DP release"):
        result.intervals()


def test_explain_gives_cost_and_widths_and_spends_nothing(client: confer.Client) -> None:
    query = (
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.5, delta = 1e-6, max_groups_contributed = 2) "
        "drug_concept_id, COUNT(DISTINCT person_id) AS patients FROM drug_exposure GROUP BY drug_concept_id"
    )
    before = client.budget()
    explained = client.explain(query)
    assert client.explain("EXPLAIN PRIVACY " + query).cost_per_site == explained.cost_per_site
    assert explained.mechanism == "gaussian"
    cost = explained.cost_per_site
    assert cost is not None and cost.epsilon == pytest.approx(0.5) and cost.delta == pytest.approx(1e-6)
    assert cost.rho > 0
    assert [a.name for a in explained.aggregates] == ["patients"]
    patients = explained.aggregates[0]
    assert patients.expression.startswith("COUNT(DISTINCT person_id)")
    assert patients.noise_stddev is not None and patients.noise_stddev > 0
    assert patients.interval_half_width is not None and patients.interval_half_width > patients.noise_stddev
    widths = explained.widths()
    assert widths.columns == ["aggregate", "partial", "noise_stddev", "interval_half_width", "interval_width"]
    assert widths["interval_width"][0] == pytest.approx(2 * patients.interval_half_width)
    assert explained.local_query and "drug_exposure" in explained.local_query
    assert explained.df.columns == ["item", "value"]
    assert "cost per node" in str(explained)
    after = client.budget()
    assert after["spent_rho"].to_list() == before["spent_rho"].to_list()


def test_explain_predicts_the_interval_width_of_the_release(client: confer.Client) -> None:
    query = (
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.0, delta = 1e-6) "
        "COUNT(*) AS persons FROM person"
    )
    half = client.explain(query).aggregates[0].interval_half_width
    assert half is not None
    df = client.sql(query).df
    width = (df["persons_ci_high"] - df["persons_ci_low"])[0]
    assert width == pytest.approx(2 * half, rel=0.05, abs=2.0)


def test_budget_is_spent_by_a_query(client: confer.Client) -> None:
    before = client.budget()
    assert {"node", "study", "status", "budget_rho", "spent_rho", "remaining_rho", "releases"} <= set(
        before.columns
    )
    nodes = before.filter(pl.col("node").str.starts_with("site-"))
    assert nodes["node"].to_list() == ["site-a", "site-b", "site-c"]
    assert (nodes["status"] == "approved").all()
    assert before.height == 4  # the nodes, then the network row
    result = client.sql(DP_COUNT)
    assert result.release is not None
    after = client.budget().filter(pl.col("node").str.starts_with("site-"))
    spent = after["spent_rho"] - nodes["spent_rho"]
    assert spent.to_list() == pytest.approx([result.release.cost_per_site.rho] * 3, rel=1e-6)
    assert (after["releases"] > nodes["releases"]).all()
    assert (after["remaining_rho"] < nodes["remaining_rho"]).all()


def test_the_study_can_be_chosen_per_call(network: confer.LocalNetwork) -> None:
    with confer.connect(network.url, token=network.token) as plain:
        assert plain.study is None
        with pytest.raises(confer.RefusedError, match="study"):
            plain.sql(DP_COUNT)
        with pytest.raises(confer.ConfigurationError, match="needs a study"):
            plain.budget()
        result = plain.sql(DP_COUNT, study=network.study)
        assert result.release is not None
        assert plain.budget(network.study).height == 4
        # EXPLAIN needs no study.
        assert plain.explain(DP_COUNT).cost_per_site is not None
