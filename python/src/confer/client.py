"""A connection to a confer coordinator: DP SQL over ADBC Flight SQL, and
confer's custom Flight actions (catalog, studies, nodes, training) over
``pyarrow.flight``."""

from __future__ import annotations

import ipaddress
import json
import os
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import polars as pl
import pyarrow as pa
import pyarrow.flight as flight

from .errors import (
    ConferError,
    ConfigurationError,
    DeadlineExceededError,
    InternalError,
    from_adbc,
    from_flight,
    metadata_from_pairs,
)
from .results import Explanation, QueryResult

if TYPE_CHECKING:
    from .training import Job, JobSpecInput

__all__ = [
    "Catalog",
    "Client",
    "Column",
    "Domain",
    "Study",
    "Table",
    "User",
    "connect",
]

#: gRPC header naming the study a request runs under.
STUDY_HEADER = "x-confer-study"
_ADBC_HEADER = "adbc.flight.sql.rpc.call_header."
#: Further attempts at fetching a result whose failure is marked retryable
#: (a node went away mid-query): the same ticket is the same task, which
#: nodes that already answered serve from their ledgers at no charge.
FETCH_RETRIES = 2
_MAX_MESSAGE = 64 * 1024 * 1024


def connect(
    url: str | None = None,
    token: str | None = None,
    *,
    study: str | None = None,
    tls: bool | None = None,
    ca: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
    verify: bool = True,
) -> Client:
    """Connects to a confer coordinator.

    Args:
        url: The coordinator: ``http://127.0.0.1:50051`` (plaintext, loopback
            only with a token), ``https://host:port`` (TLS), ``grpc://`` and
            ``grpc+tls://`` URLs, or ``host:port`` (plaintext);
            ``CONFER_COORDINATOR`` when not given, as for the ``confer`` CLI.
        token: Your bearer token (``CONFER_TOKEN`` when not given).
        study: The study statements and jobs run under by default (its
            budget pays); ``CONFER_STUDY`` when not given.
        tls: Force TLS on (``True``) or off (``False``); by default the
            URL's scheme decides.
        ca: The network CA certificate (PEM) that signed the coordinator's
            certificate (``CONFER_CA`` when not given); the system's roots
            otherwise.
        cert: A client certificate (PEM) for mutual TLS, with ``key``.
        key: Its private key (PEM).
        timeout: Seconds any one call may take before it fails with
            :class:`~confer.DeadlineExceededError`.
        verify: Ask the coordinator who you are now (``confer.whoami``), so
            a wrong URL or token fails here rather than at the first query.

    Returns:
        A :class:`Client`; use it as a context manager or call ``close()``.

    Raises:
        ConfigurationError: A malformed URL, missing TLS files, or a token
            that would travel in plaintext beyond this machine.
        AuthenticationError: The coordinator does not know the token.
        UnavailableError: Nothing answers at ``url``.
    """
    if url is None:
        url = os.environ.get("CONFER_COORDINATOR")
        if not url:
            raise ConfigurationError("give the coordinator's URL (or set CONFER_COORDINATOR)")
    client = Client(
        url,
        token=token if token is not None else os.environ.get("CONFER_TOKEN"),
        study=study if study is not None else os.environ.get("CONFER_STUDY"),
        tls=tls,
        ca=ca if ca is not None else os.environ.get("CONFER_CA"),
        cert=cert,
        key=key,
        timeout=timeout,
    )
    if verify:
        try:
            client.whoami()
        except BaseException:
            client.close()
            raise
    return client


@dataclass(frozen=True)
class User:
    """A user of the coordinator (``confer.whoami``).

    Attributes:
        name: Login name.
        role: ``researcher``, ``analyst``, ``data_scientist`` or ``admin``.
        created: When the user was created.
        revoked: When the user was revoked, if they were.
    """

    name: str
    role: str
    created: datetime | None
    revoked: datetime | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> User:
        """Reads the coordinator's JSON."""
        return cls(
            name=str(data["name"]),
            role=str(data.get("role", "")),
            created=_time(data.get("created_ms")),
            revoked=_time(data.get("revoked_ms")),
        )


@dataclass(frozen=True)
class Study:
    """A study: who may run statements under it and the budget its stewards approved.

    Attributes:
        name: Short name (what ``study=`` takes).
        title: Title.
        principal_investigator: The PI's user name.
        members: Members' user names.
        tables: The tables it may read (empty: any).
        requested_epsilon: Requested epsilon per node.
        requested_delta: Requested delta per node.
        ethics_ref: Ethics approval reference.
        min_sites: Fewest sites that must answer (``None``: every site).
        created: When it was created.
        created_by: Who created it.
    """

    name: str
    title: str
    principal_investigator: str
    members: list[str]
    tables: list[str]
    requested_epsilon: float
    requested_delta: float
    ethics_ref: str
    min_sites: int | None
    created: datetime | None
    created_by: str | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Study:
        """Reads the coordinator's JSON."""
        return cls(
            name=str(data["name"]),
            title=str(data.get("title", "")),
            principal_investigator=str(data.get("principal_investigator", "")),
            members=[str(m) for m in data.get("members") or []],
            tables=[str(t) for t in data.get("tables") or []],
            requested_epsilon=float(data.get("requested_epsilon", 0.0)),
            requested_delta=float(data.get("requested_delta", 0.0)),
            ethics_ref=str(data.get("ethics_ref", "")),
            min_sites=data.get("min_sites"),
            created=_time(data.get("created_ms")),
            created_by=data.get("created_by"),
        )


@dataclass(frozen=True)
class Domain:
    """The public values of a group column: a list, or every integer from
    ``lo`` to ``hi``.

    Attributes:
        kind: ``"values"`` or ``"range"``.
        values: The values (kind ``values``).
        lo: First value (kind ``range``).
        hi: Last value (kind ``range``).
    """

    kind: str
    values: list[int | str] | None = None
    lo: int | None = None
    hi: int | None = None

    def __len__(self) -> int:
        if self.kind == "range" and self.lo is not None and self.hi is not None:
            return max(0, self.hi - self.lo + 1)
        return len(self.values or [])

    def __str__(self) -> str:
        if self.kind == "range":
            return f"{self.lo}..{self.hi}"
        shown = ", ".join(map(str, (self.values or [])[:8]))
        more = len(self) - 8
        return f"{{{shown}{', ...' if more > 0 else ''}}}"


@dataclass(frozen=True)
class Column:
    """A column as the network publishes it.

    Attributes:
        name: Column name.
        type: ``int64``, ``float64``, ``utf8``, ``date``, ``timestamp`` or ``boolean``.
        bounds: Declared value bounds (lo, hi), if any.
        domain: Public group domain, if any.
    """

    name: str
    type: str
    bounds: tuple[float, float] | None
    domain: Domain | None


@dataclass(frozen=True)
class Table:
    """A table as the network publishes it: never row counts or values of
    private tables.

    Attributes:
        name: Table name.
        privacy_unit: The column identifying a person (``None``: a public table).
        one_row_per_unit: Whether each unit has at most one row.
        columns: Its columns.
        sites: The sites publishing it.
    """

    name: str
    privacy_unit: str | None
    one_row_per_unit: bool
    columns: list[Column]
    sites: list[str]

    @property
    def private(self) -> bool:
        """Whether the table holds person-level rows (queries need the DP clause)."""
        return self.privacy_unit is not None

    def column(self, name: str) -> Column:
        """The column called ``name``."""
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"table {self.name} has no column {name}")


@dataclass(frozen=True)
class Catalog:
    """The network catalog (``confer.catalog``).

    Attributes:
        sites: Sites that answered.
        missing_sites: Sites that did not (their tables may be missing here).
        tables: The tables, by name order.
    """

    sites: list[str]
    missing_sites: list[str]
    tables: list[Table]

    def table(self, name: str) -> Table:
        """The table called ``name``."""
        for t in self.tables:
            if t.name == name:
                return t
        known = ", ".join(t.name for t in self.tables)
        raise KeyError(f"table {name} is not in the network catalog; known tables: {known}")

    def to_polars(self) -> pl.DataFrame:
        """One row per column: ``table``, ``column``, ``type``,
        ``privacy_unit`` (whether it is the table's unit), ``bounds_low``,
        ``bounds_high``, ``domain_size``, ``domain``."""
        rows: dict[str, list[Any]] = {
            k: []
            for k in (
                "table",
                "column",
                "type",
                "privacy_unit",
                "bounds_low",
                "bounds_high",
                "domain_size",
                "domain",
            )
        }
        for t in self.tables:
            for c in t.columns:
                rows["table"].append(t.name)
                rows["column"].append(c.name)
                rows["type"].append(c.type)
                rows["privacy_unit"].append(c.name == t.privacy_unit)
                rows["bounds_low"].append(c.bounds[0] if c.bounds else None)
                rows["bounds_high"].append(c.bounds[1] if c.bounds else None)
                rows["domain_size"].append(len(c.domain) if c.domain else None)
                rows["domain"].append(str(c.domain) if c.domain else None)
        return pl.DataFrame(
            rows,
            schema={
                "table": pl.Utf8,
                "column": pl.Utf8,
                "type": pl.Utf8,
                "privacy_unit": pl.Boolean,
                "bounds_low": pl.Float64,
                "bounds_high": pl.Float64,
                "domain_size": pl.Int64,
                "domain": pl.Utf8,
            },
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Catalog:
        """Reads the coordinator's JSON (``CatalogListing``)."""
        tables = []
        for t in data.get("tables") or []:
            columns = []
            for c in t.get("columns") or []:
                bounds = c.get("bounds")
                domain = c.get("domain")
                columns.append(
                    Column(
                        name=str(c["name"]),
                        type=str(c.get("column_type", "")),
                        bounds=(float(bounds[0]), float(bounds[1])) if bounds else None,
                        domain=Domain(
                            kind=str(domain.get("kind")),
                            values=domain.get("values"),
                            lo=domain.get("lo"),
                            hi=domain.get("hi"),
                        )
                        if domain
                        else None,
                    )
                )
            tables.append(
                Table(
                    name=str(t["name"]),
                    privacy_unit=t.get("privacy_unit"),
                    one_row_per_unit=bool(t.get("one_row_per_unit", False)),
                    columns=columns,
                    sites=[str(s) for s in t.get("sites") or []],
                )
            )
        return cls(
            sites=[str(s) for s in data.get("sites") or []],
            missing_sites=[str(s) for s in data.get("missing_sites") or []],
            tables=sorted(tables, key=lambda t: t.name),
        )


class _HeaderSink(flight.ClientMiddlewareFactory):
    """Keeps the headers and trailers of the latest Flight call, where
    confer puts ``confer-retryable``, ``confer-reason`` and ``confer-site``."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: dict[str, str] = {}

    def start_call(self, info: Any) -> flight.ClientMiddleware:
        return _HeaderMiddleware(self)


class _HeaderMiddleware(flight.ClientMiddleware):
    def __init__(self, sink: _HeaderSink) -> None:
        super().__init__()
        self._sink = sink

    def received_headers(self, headers: Any) -> None:
        self._sink.headers.update(metadata_from_pairs(headers.items()))

    def sending_headers(self) -> dict[str, Any]:
        return {}

    def call_completed(self, exception: Any) -> None:
        pass


@dataclass(frozen=True)
class _Endpoint:
    location: str
    tls: bool
    host: str


def _parse_url(url: str, tls: bool | None) -> _Endpoint:
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError("the coordinator URL is empty: give http://host:port or https://host:port")
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ConfigurationError(f"{url!r} is not a valid coordinator URL: {e}") from None
    scheme = parts.scheme.lower()
    secure = {"http": False, "grpc": False, "grpc+tcp": False, "https": True, "grpc+tls": True}
    if scheme not in secure:
        raise ConfigurationError(
            f"{url!r} is not a coordinator URL: use http://host:port (loopback) or https://host:port"
        )
    host = parts.hostname
    if not host or port is None or " " in text:
        raise ConfigurationError(f"{url!r} is not a valid coordinator URL: it needs a host and a port")
    if parts.path not in ("", "/"):
        raise ConfigurationError(f"{url!r} is not a valid coordinator URL: it has a path ({parts.path})")
    use_tls = secure[scheme] if tls is None else tls
    shown = f"[{host}]" if ":" in host else host
    return _Endpoint(location=f"{'grpc+tls' if use_tls else 'grpc'}://{shown}:{port}", tls=use_tls, host=host)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_pem(path: str | os.PathLike[str] | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigurationError(f"cannot read the {what} {os.fspath(path)}: {e.strerror}") from None


def _attribute_frame(items: Sequence[Any], schema: dict[str, Any]) -> pl.DataFrame:
    """One row per item, one column per entry of ``schema``: the item's
    attribute of that name, with that type."""
    return pl.DataFrame({name: [getattr(i, name) for i in items] for name in schema}, schema=schema)


def _time(ms: Any) -> datetime | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(float(ms) / 1000.0, tz=timezone.utc)


class Client:
    """A connection to a confer coordinator. Make one with :func:`connect`.

    SQL goes through the ADBC Flight SQL driver, confer's custom actions
    through ``pyarrow.flight``; every call fails after ``timeout`` seconds
    rather than hang. Errors are :class:`~confer.ConferError`\\ s carrying
    confer's message and whether a retry may help.

    A client is not meant to be shared between threads; calls on one client
    run one at a time.

    Listings (``tables()``, ``studies()``, ``nodes()``, ``budget()``,
    ``jobs()``) return polars DataFrames; single things (``whoami()``,
    ``study_info()``, ``catalog()``) return typed objects.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        study: str | None = None,
        tls: bool | None = None,
        ca: str | os.PathLike[str] | None = None,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        if timeout is None or not timeout > 0:
            raise ConfigurationError("timeout must be a positive number of seconds")
        endpoint = _parse_url(url, tls)
        if token and not endpoint.tls and not _is_loopback(endpoint.host):
            raise ConfigurationError(
                f"refusing to send a bearer token in plaintext to {endpoint.host}: connect with "
                "https:// and ca= (the network CA certificate), or use a loopback address"
            )
        if (cert is None) != (key is None):
            raise ConfigurationError("a client certificate needs both cert= and key=")
        self.url: str = url
        self.study: str | None = study or None
        self.timeout: float = float(timeout)
        self._token = token or None
        self._endpoint = endpoint
        self._lock = threading.RLock()
        self._closed = False
        ca_pem = _read_pem(ca, "CA certificate")
        cert_pem = _read_pem(cert, "client certificate")
        key_pem = _read_pem(key, "client key")

        self._sink = _HeaderSink()
        flight_kwargs: dict[str, Any] = {
            "middleware": [self._sink],
            "generic_options": [
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
                ("grpc.max_send_message_length", _MAX_MESSAGE),
            ],
        }
        if endpoint.tls:
            if ca_pem is not None:
                flight_kwargs["tls_root_certs"] = ca_pem
            if cert_pem is not None:
                flight_kwargs["cert_chain"] = cert_pem
                flight_kwargs["private_key"] = key_pem
        try:
            self._flight = flight.FlightClient(endpoint.location, **flight_kwargs)
        except (pa.ArrowException, ValueError, TypeError) as e:
            raise ConfigurationError(f"{url!r} is not a valid coordinator URL: {e}") from None

        db_kwargs: dict[str, str] = {
            "adbc.flight.sql.rpc.timeout_seconds.query": str(self.timeout),
            "adbc.flight.sql.rpc.timeout_seconds.fetch": str(self.timeout),
            "adbc.flight.sql.rpc.timeout_seconds.update": str(self.timeout),
            "adbc.flight.sql.client_option.with_max_msg_size": str(_MAX_MESSAGE),
        }
        if self._token:
            db_kwargs["adbc.flight.sql.authorization_header"] = f"Bearer {self._token}"
        if self.study:
            db_kwargs[_ADBC_HEADER + STUDY_HEADER] = self.study
        if endpoint.tls:
            if ca_pem is not None:
                db_kwargs["adbc.flight.sql.client_option.tls_root_certs"] = ca_pem.decode()
            if cert_pem is not None and key_pem is not None:
                db_kwargs["adbc.flight.sql.client_option.mtls_cert_chain"] = cert_pem.decode()
                db_kwargs["adbc.flight.sql.client_option.mtls_private_key"] = key_pem.decode()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._sql = flightsql.connect(endpoint.location, db_kwargs=db_kwargs)
        except adbc_driver_manager.Error as e:
            self._flight.close()
            raise from_adbc(e) from None

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Closes the connection (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._sql.close()
            except Exception:  # noqa: BLE001 - closing must not raise
                pass
            try:
                self._flight.close()
            except Exception:  # noqa: BLE001
                pass

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<confer.Client {self._endpoint.location} study={self.study!r} {state}>"

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigurationError("this client is closed: connect again")

    def _explained(self, err: ConferError, timeout: float | None = None) -> ConferError:
        """Says which timeout ran out, for a deadline error."""
        if isinstance(err, DeadlineExceededError):
            err.message = (
                f"no answer from the coordinator within {timeout or self.timeout:g} s "
                f"(timeout=): {err.message}"
            )
            err.args = (err.message,)
        return err

    # -- SQL ---------------------------------------------------------------

    @contextmanager
    def _cursor(self, study: str | None) -> Iterator[Any]:
        self._check_open()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cursor = self._sql.cursor()
        try:
            if study is not None and study != self.study:
                cursor.adbc_statement.set_options(**{_ADBC_HEADER + STUDY_HEADER: study})
            yield cursor
        finally:
            try:
                cursor.close()
            except Exception:  # noqa: BLE001
                pass

    def _run(self, statement: str, study: str | None = None) -> pa.Table:
        if not isinstance(statement, str) or not statement.strip():
            raise ConfigurationError("the statement is empty")
        with self._lock, self._cursor(study) as cursor:
            try:
                partitions, schema = cursor.adbc_execute_partitions(statement)
            except adbc_driver_manager.Error as e:
                raise self._explained(from_adbc(e)) from None
            tables: list[pa.Table] = []
            for partition in partitions:
                attempt = 0
                while True:
                    try:
                        cursor.adbc_read_partition(partition)
                        tables.append(cursor.fetch_arrow_table())
                        break
                    except adbc_driver_manager.Error as e:
                        err = self._explained(from_adbc(e))
                        if not err.retryable or attempt >= FETCH_RETRIES:
                            raise err from None
                        attempt += 1
                        time.sleep(0.25 * (2**attempt))
        if not tables:
            if schema is None:
                raise InternalError("the coordinator sent neither rows nor a schema")
            return schema.empty_table()
        first = tables[0]
        if len(tables) == 1:
            return first
        return pa.concat_tables([t.cast(first.schema) for t in tables])

    def sql(self, statement: str, *, study: str | None = None) -> QueryResult:
        """Runs a statement in confer's DP SQL dialect (``docs/dp-sql.md``).

        Args:
            statement: A DP query (``SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS
                (epsilon = 1.0, delta = 1e-6) ...``), a query of public tables,
                ``EXPLAIN PRIVACY ...`` or ``SHOW PRIVACY BUDGET``.
            study: The study it runs under (default: the client's).

        Returns:
            A :class:`~confer.QueryResult`: ``.df`` (a polars DataFrame with
            each DP value followed by ``<name>_ci_low`` and
            ``<name>_ci_high``), ``.release`` (cost per site, sites
            answered, mechanism, missing sites, confidence) and ``.arrow``.

        Raises:
            RefusedError: The query is refused (the message says what to change).
            BudgetError: It would exceed a budget or a per-query cap; nothing spent.
            NotFoundError: An unknown study.
            AuthError: A bad token, or no right to the study or a table.
            UnavailableError: The coordinator or too many nodes are unreachable.
        """
        return QueryResult(self._run(statement, study))

    def explain(self, statement: str) -> Explanation:
        """What a DP query would cost and how wide its intervals would be
        (``EXPLAIN PRIVACY``): nothing is sent to the nodes, nothing spent.

        Args:
            statement: The DP query (with or without ``EXPLAIN PRIVACY`` in front).

        Returns:
            An :class:`~confer.Explanation`: ``.cost_per_site``,
            ``.mechanism``, ``.aggregates`` (expected noise and interval
            half-width of each), ``.widths()`` as a DataFrame, ``.df`` (the
            raw ``item``/``value`` rows) and ``.local_query``.
        """
        text = statement.strip()
        if not text.upper().startswith("EXPLAIN"):
            text = "EXPLAIN PRIVACY " + text
        return Explanation(self._run(text, None))

    def budget(self, study: str | None = None) -> pl.DataFrame:
        """``SHOW PRIVACY BUDGET``: one row per node, then a network row.

        Columns include ``node``, ``study``, ``status``, ``budget_rho``,
        ``spent_rho``, ``remaining_rho``, ``spent_epsilon``,
        ``remaining_epsilon``, ``delta`` and ``releases`` (see
        ``docs/dp-sql.md``).

        Args:
            study: The study to report (default: the client's).
        """
        study = study or self.study
        if not study:
            raise ConfigurationError("budget() needs a study: pass study= here or to connect()")
        return self.sql("SHOW PRIVACY BUDGET", study=study).df

    # -- custom actions ----------------------------------------------------

    def action(
        self,
        name: str,
        body: bytes | str | Mapping[str, Any] | list[Any] | None = None,
        *,
        study: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Calls one of the coordinator's custom Flight actions and returns
        its JSON answer (the low-level way to what the other methods do;
        ``protocol/src/coordinator.rs`` lists the actions).

        Args:
            name: The action (``confer.whoami``, ``confer.train.status``, ...).
            body: Its body: JSON-encoded if a mapping or list, UTF-8 if text.
            study: The study header (default: the client's).
            timeout: Seconds (default: the client's timeout).
        """
        self._check_open()
        if body is None:
            payload = b""
        elif isinstance(body, bytes):
            payload = body
        elif isinstance(body, str):
            payload = body.encode()
        else:
            payload = json.dumps(body).encode()
        headers: list[tuple[bytes, bytes]] = []
        if self._token:
            headers.append((b"authorization", f"Bearer {self._token}".encode()))
        study = study or self.study
        if study:
            headers.append((STUDY_HEADER.encode(), study.encode()))
        options = flight.FlightCallOptions(headers=headers, timeout=timeout or self.timeout)
        with self._lock:
            self._sink.headers = {}
            try:
                results = list(self._flight.do_action(flight.Action(name, payload), options))
            except (flight.FlightError, pa.ArrowException) as e:
                err = from_flight(e, dict(self._sink.headers))
                raise self._explained(err, timeout or self.timeout) from None
        if not results:
            raise InternalError(f"the coordinator returned nothing for {name}")
        raw = results[0].body.to_pybytes()
        try:
            return json.loads(raw)
        except ValueError as e:
            raise InternalError(f"the coordinator's answer to {name} is not JSON: {e}") from None

    def whoami(self) -> User:
        """The user this client's token belongs to."""
        return User.from_json(self.action("confer.whoami"))

    def catalog(self) -> Catalog:
        """The network catalog: tables, columns, types, bounds, domains and
        the sites publishing each table; never row counts or values of
        private tables. ``catalog().to_polars()`` gives one row per column."""
        return Catalog.from_json(self.action("confer.catalog"))

    def tables(self) -> pl.DataFrame:
        """One row per published table: ``table``, ``private`` (person-level
        rows: queries need the DP clause), ``privacy_unit``,
        ``one_row_per_unit``, ``columns`` (how many), ``sites``."""
        catalog = self.catalog()
        return pl.DataFrame(
            {
                "table": [t.name for t in catalog.tables],
                "private": [t.private for t in catalog.tables],
                "privacy_unit": [t.privacy_unit for t in catalog.tables],
                "one_row_per_unit": [t.one_row_per_unit for t in catalog.tables],
                "columns": [len(t.columns) for t in catalog.tables],
                "sites": [t.sites for t in catalog.tables],
            },
            schema={
                "table": pl.Utf8,
                "private": pl.Boolean,
                "privacy_unit": pl.Utf8,
                "one_row_per_unit": pl.Boolean,
                "columns": pl.Int64,
                "sites": pl.List(pl.Utf8),
            },
        )

    def studies(self) -> pl.DataFrame:
        """The studies you may use (all of them for admins): one row each,
        with ``name``, ``title``, ``principal_investigator``, ``members``,
        ``tables``, ``requested_epsilon``, ``requested_delta``,
        ``ethics_ref``, ``min_sites``, ``created``, ``created_by``."""
        studies = [Study.from_json(s) for s in self.action("confer.study.list")]
        return _attribute_frame(
            studies,
            {
                "name": pl.Utf8,
                "title": pl.Utf8,
                "principal_investigator": pl.Utf8,
                "members": pl.List(pl.Utf8),
                "tables": pl.List(pl.Utf8),
                "requested_epsilon": pl.Float64,
                "requested_delta": pl.Float64,
                "ethics_ref": pl.Utf8,
                "min_sites": pl.Int64,
                "created": pl.Datetime("ms", "UTC"),
                "created_by": pl.Utf8,
            },
        )

    def study_info(self, name: str | None = None) -> Study:
        """One study (default: the client's).

        Raises:
            NotFoundError: No such study.
        """
        name = name or self.study
        if not name:
            raise ConfigurationError("study_info() needs a name: pass it here or study= to connect()")
        return Study.from_json(self.action("confer.study.show", name))

    def nodes(self) -> pl.DataFrame:
        """The nodes the coordinator knows, with their health: ``name``,
        ``url``, ``healthy``, ``latency_ms``, ``version``, ``last_seen``,
        ``checked``, ``error``."""
        nodes = self.action("confer.nodes")
        return pl.DataFrame(
            {
                "name": [n.get("name") for n in nodes],
                "url": [n.get("url") for n in nodes],
                "healthy": [bool(n.get("healthy")) for n in nodes],
                "latency_ms": [n.get("latency_ms") for n in nodes],
                "version": [n.get("version") for n in nodes],
                "last_seen": [_time(n.get("last_seen_ms")) for n in nodes],
                "checked": [_time(n.get("checked_ms")) for n in nodes],
                "error": [n.get("error") for n in nodes],
            },
            schema={
                "name": pl.Utf8,
                "url": pl.Utf8,
                "healthy": pl.Boolean,
                "latency_ms": pl.Float64,
                "version": pl.Utf8,
                "last_seen": pl.Datetime("ms", "UTC"),
                "checked": pl.Datetime("ms", "UTC"),
                "error": pl.Utf8,
            },
        )

    # -- training ----------------------------------------------------------

    def train(self, job: JobSpecInput, *, study: str | None = None) -> Job:
        """Starts a federated training job (``docs/training.md``).

        Args:
            job: The job spec: a dict (the TOML format's structure), a path
                to a job TOML file, or TOML text.
            study: The study whose budget pays (default: the client's).

        Returns:
            A :class:`~confer.Job`: ``.status()``, ``.wait()``,
            ``.metrics()``, ``.cancel()``, ``.export(path)``.

        Raises:
            ConfigurationError: The spec is not TOML, or no study is given.
            RefusedError: The coordinator refuses the spec (the message
                names the field), or its feature query does not plan.
        """
        from .training import Job, JobStatus, load_job_spec

        spec = load_job_spec(job)
        study = study or self.study
        if not study:
            raise ConfigurationError(
                "a training job runs under a study (its budget pays at every node): "
                "pass study= here or to connect()"
            )
        status = JobStatus.from_json(self.action("confer.train.submit", {"study": study, "job": spec}))
        return Job(self, status.job_id, status=status, spec=spec)

    def job(self, job_id: str) -> Job:
        """A job started earlier (by id), to follow, cancel or export."""
        from .training import Job

        job = Job(self, str(job_id))
        job.status()
        return job

    def jobs(self) -> pl.DataFrame:
        """The training jobs you may see: ``job_id``, ``name``, ``study``,
        ``state``, ``round``, ``rounds``, ``owner``, ``created``,
        ``updated``, ``error``."""
        from .training import JobStatus

        jobs = [JobStatus.from_json(j) for j in self.action("confer.train.list")]
        return _attribute_frame(
            jobs,
            {
                "job_id": pl.Utf8,
                "name": pl.Utf8,
                "study": pl.Utf8,
                "state": pl.Utf8,
                "round": pl.Int64,
                "rounds": pl.Int64,
                "owner": pl.Utf8,
                "created": pl.Datetime("ms", "UTC"),
                "updated": pl.Datetime("ms", "UTC"),
                "error": pl.Utf8,
            },
        )
