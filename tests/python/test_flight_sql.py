"""Researchers' clients against a real confer coordinator: the ADBC Flight
SQL driver (DBAPI, username/token login and bearer header), raw pyarrow.flight
with hand-encoded Flight SQL commands, and catalog browsing."""

import adbc_driver_flightsql.dbapi as flightsql
import polars as pl
import pyarrow as pa
import pyarrow.flight as flight
import pytest

QUERY = (
    "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.0, delta = 1e-6) "
    "gender_concept_id, COUNT(*) AS persons FROM person GROUP BY gender_concept_id "
    "ORDER BY gender_concept_id"
)
STUDY_HEADER = "adbc.flight.sql.rpc.call_header.x-confer-study"


def _connect(federation, **extra):
    kwargs = {STUDY_HEADER: federation["study"]}
    kwargs.update(extra)
    return flightsql.connect(f"grpc://{federation['addr']}", db_kwargs=kwargs)


def test_adbc_login_with_username_and_token_runs_a_dp_query(federation):
    with _connect(federation, username=federation["user"], password=federation["token"]) as conn:
        with conn.cursor() as cur:
            cur.execute(QUERY)
            table = cur.fetch_arrow_table()
    assert table.column_names == ["gender_concept_id", "persons", "persons_ci_low", "persons_ci_high"]
    assert table.column("gender_concept_id").to_pylist() == [8507, 8532]
    assert table.schema.field("persons").type == pa.int64()
    assert table.schema.field("persons_ci_low").type == pa.float64()
    low, value, high = (table.column(c).to_pylist() for c in ("persons_ci_low", "persons", "persons_ci_high"))
    assert all(lo < v < hi for lo, v, hi in zip(low, value, high))
    # GiBleed has 2,694 persons; the noise at epsilon 1 is a few units.
    assert abs(sum(value) - 2694) < 200
    meta = table.schema.field("persons").metadata
    assert meta[b"confer.mechanism"] == b"gaussian"
    assert meta[b"confer.interval"] == b"persons_ci_low,persons_ci_high"
    # Results arrive as Arrow, so polars takes them for free.
    frame = pl.from_arrow(table)
    assert frame.height == 2


def test_adbc_bearer_header_and_errors_as_grpc_statuses(federation):
    auth = {"adbc.flight.sql.authorization_header": f"Bearer {federation['token']}"}
    with _connect(federation, **auth) as conn:
        with conn.cursor() as cur:
            cur.execute(QUERY)
            assert cur.fetch_arrow_table().num_rows == 2
            with pytest.raises(Exception) as refused:
                cur.execute("SELECT person_id FROM person")
            assert "needs the DP clause" in str(refused.value)
            with pytest.raises(Exception) as unknown:
                cur.execute(QUERY.replace("FROM person", "FROM persons"))
            assert "not in the network catalog" in str(unknown.value)


def test_a_client_without_a_token_is_refused(federation):
    with _connect(federation) as conn:
        with conn.cursor() as cur:
            with pytest.raises(Exception) as refused:
                cur.execute(QUERY)
    assert "no credentials" in str(refused.value) or "UNAUTHENTICATED" in str(refused.value).upper()


def test_adbc_browses_the_catalog(federation):
    auth = {"adbc.flight.sql.authorization_header": f"Bearer {federation['token']}"}
    with _connect(federation, **auth) as conn:
        objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
        catalogs = {o["catalog_name"] for o in objects}
        assert "confer" in catalogs
        confer = next(o for o in objects if o["catalog_name"] == "confer")
        schemas = {s["db_schema_name"]: s for s in confer["catalog_db_schemas"]}
        tables = {t["table_name"] for t in schemas["omop"]["db_schema_tables"]}
        assert {"person", "condition_occurrence", "concept"} <= tables
        schema = conn.adbc_get_table_schema("person", catalog_filter="confer", db_schema_filter="omop")
        assert "gender_concept_id" in schema.names
        field = schema.field("gender_concept_id")
        assert b"confer.domain" in (field.metadata or {})
        assert (schema.field("person_id").metadata or {}).get(b"confer.privacy_unit") == b"true"
        info = conn.adbc_get_info()
        assert info["vendor_name"] == "confer"


def _any(type_name: str, message: bytes) -> bytes:
    """Wraps an encoded protobuf message in google.protobuf.Any."""
    url = f"type.googleapis.com/arrow.flight.protocol.sql.{type_name}".encode()
    return _field(1, url) + _field(2, message)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _flight(federation, token):
    client = flight.FlightClient(f"grpc://{federation['addr']}")
    headers = [(b"x-confer-study", federation["study"].encode())]
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    return client, flight.FlightCallOptions(headers=headers)


def test_pyarrow_flight_speaks_flight_sql(federation):
    client, options = _flight(federation, federation["token"])
    command = _any("CommandStatementQuery", _field(1, QUERY.encode()))
    info = client.get_flight_info(flight.FlightDescriptor.for_command(command), options)
    assert info.schema.names == ["gender_concept_id", "persons", "persons_ci_low", "persons_ci_high"]
    table = client.do_get(info.endpoints[0].ticket, options).read_all()
    assert table.num_rows == 2
    assert b"confer.result" in table.schema.metadata

    tables = _any("CommandGetTables", b"")
    info = client.get_flight_info(flight.FlightDescriptor.for_command(tables), options)
    listing = client.do_get(info.endpoints[0].ticket, options).read_all()
    assert "person" in listing.column("table_name").to_pylist()


def test_pyarrow_flight_custom_actions_and_roles(federation):
    client, options = _flight(federation, federation["token"])
    whoami = list(client.do_action(flight.Action("confer.whoami", b""), options))
    assert b'"researcher"' in whoami[0].body.to_pybytes()
    nodes = list(client.do_action(flight.Action("confer.nodes", b""), options))
    assert b"site-a" in nodes[0].body.to_pybytes()
    with pytest.raises(flight.FlightError) as refused:
        list(client.do_action(flight.Action("confer.user.list", b""), options))
    assert "admin role" in str(refused.value)
    admin, admin_options = _flight(federation, federation["admin_token"])
    users = list(admin.do_action(flight.Action("confer.user.list", b""), admin_options))
    assert b"researcher" in users[0].body.to_pybytes()


def test_adbc_reads_the_released_supervision_statistics(federation):
    """The demo's commission coordinator released last month over its
    synthetic region (and the month before, `--trend-months 1`, for the web
    console's trend lines); any Flight SQL client reads the values with
    plain SQL, no DP clause and no study."""
    assert "commission_addr" in federation, "confer demo --serve printed no commission coordinator"
    with flightsql.connect(
        f"grpc://{federation['commission_addr']}",
        db_kwargs={"username": "admin", "password": federation["commission_token"]},
    ) as conn:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT v.period, v.unit, u.level, v.indicator, v.value, v.ci_low, v.ci_high, v.flags "
                "FROM supervision.values v JOIN supervision.org_units u ON v.unit = u.code "
                "WHERE v.category = '' ORDER BY u.path, v.indicator"
            )
            values = cur.fetch_arrow_table()
            cur.execute("SELECT * FROM supervision.periods")
            periods = cur.fetch_arrow_table()
            cur.execute("SELECT id, name_zh FROM supervision.indicators")
            indicators = cur.fetch_arrow_table()
    assert periods.num_rows == 2 and periods.column("complete").to_pylist() == [True, True]
    assert len(set(values.column("period").to_pylist())) == 2
    assert {"city", "county", "township", "village"} <= set(values.column("level").to_pylist())
    assert "门诊药占比" in indicators.column("name_zh").to_pylist()
    frame = pl.from_arrow(values)
    # Insufficient data carries no value; every value has its interval.
    insufficient = frame.filter(pl.col("flags").str.contains("insufficient"))
    assert insufficient["value"].null_count() == insufficient.height
    shown = frame.filter(pl.col("value").is_not_null() & pl.col("ci_low").is_not_null())
    assert shown.height > 0
    assert (shown["ci_low"] <= shown["value"]).all() and (shown["value"] <= shown["ci_high"]).all()
    # Completeness is exact and full: every node reported.
    completeness = frame.filter(pl.col("indicator") == "reporting_completeness")["value"].to_list()
    assert completeness and all(v == 100.0 for v in completeness)
