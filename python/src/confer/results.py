"""What a statement returns: DP results with their release metadata, and
EXPLAIN PRIVACY answers.

A DP query's answer is Arrow with confer's metadata on it (see
``docs/dp-sql.md``, "The result"): on the schema ``confer.result`` (the
query id, the sites that answered, the cost per site, the confidence) and
``confer.missing_sites``; on each DP value column ``confer.mechanism``,
``confer.confidence``, ``confer.interval`` (its interval columns),
``confer.noise_stddev`` and ``confer.interval_note``. :class:`QueryResult`
keeps the Arrow table, gives the rows as a polars DataFrame and the
metadata as a typed :class:`Release`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa

from .errors import InternalError

__all__ = [
    "ColumnRelease",
    "Cost",
    "ExplainedAggregate",
    "Explanation",
    "QueryResult",
    "Release",
]

# Arrow metadata keys (protocol/src/lib.rs, module `metadata`).
RESULT = "confer.result"
MISSING_SITES = "confer.missing_sites"
NOISE_STDDEV = "confer.noise_stddev"
MECHANISM = "confer.mechanism"
CONFIDENCE = "confer.confidence"
INTERVAL = "confer.interval"
INTERVAL_NOTE = "confer.interval_note"
EXPLAIN = "confer.explain"


@dataclass(frozen=True)
class Cost:
    """The privacy cost of one release at one site.

    Attributes:
        rho: zCDP rho (composes by addition).
        epsilon: Epsilon of the (epsilon, delta)-DP guarantee (pure DP
            under the Laplace mechanism, where ``delta`` is 0).
        delta: Delta of that guarantee.
    """

    rho: float
    epsilon: float
    delta: float

    def __str__(self) -> str:
        if self.delta > 0:
            delta = f"{self.delta:g}".replace("e-0", "e-").replace("e+0", "e+")
            return f"epsilon = {self.epsilon:.4f}, delta = {delta} (rho = {self.rho:.4f} zCDP)"
        return f"epsilon = {self.epsilon:.4f} (pure DP)"


@dataclass(frozen=True)
class ColumnRelease:
    """How one DP value column was released.

    Attributes:
        column: The value column.
        mechanism: ``"gaussian"`` or ``"laplace"``.
        confidence: Confidence level of its interval columns (0.95).
        interval: The names of its (low, high) interval columns, if it has any.
        noise_stddev: Standard deviation of the noise, when it is the same
            for every group (counts and sums).
        interval_note: Why the interval columns are NULL, for a
            post-processed value whose interval is not derived.
    """

    column: str
    mechanism: str | None
    confidence: float | None
    interval: tuple[str, str] | None
    noise_stddev: float | None
    interval_note: str | None


@dataclass(frozen=True)
class Release:
    """The metadata of a DP release, as the coordinator attaches it.

    Attributes:
        query_id: The query (and task) id.
        sites: The sites whose partials were combined.
        cost_per_site: What the query cost at each of those sites.
        confidence: Confidence level of the interval columns.
        missing_sites: Sites that did not answer.
        columns: Per DP value column, how it was released.
    """

    query_id: str
    sites: list[str]
    cost_per_site: Cost
    confidence: float
    missing_sites: list[str] = field(default_factory=list)
    columns: dict[str, ColumnRelease] = field(default_factory=dict)

    @property
    def sites_answered(self) -> int:
        """How many sites' partials the result combines."""
        return len(self.sites)

    @property
    def mechanism(self) -> str | None:
        """The mechanism of the value columns (``"gaussian"``,
        ``"laplace"``), or ``None`` if they differ or there are none."""
        names = {c.mechanism for c in self.columns.values() if c.mechanism}
        return names.pop() if len(names) == 1 else None

    @property
    def value_columns(self) -> list[str]:
        """The DP value columns, in result order."""
        return list(self.columns)

    def summary(self) -> str:
        """One line on what the answer cost and where it came from, as
        ``confer query`` prints it under a table."""
        line = (
            f"{self.confidence * 100:.0f}% confidence intervals. Cost at each site: "
            f"{self.cost_per_site}. Sites: {', '.join(self.sites)}."
        )
        if self.missing_sites:
            line += f" Missing (did not answer): {', '.join(self.missing_sites)}."
        return line

    def __str__(self) -> str:
        mechanism = f" Mechanism: {self.mechanism}." if self.mechanism else ""
        return self.summary() + mechanism

    @classmethod
    def from_schema(cls, schema: pa.Schema) -> Release | None:
        """The release described by a result schema's metadata, or ``None``
        for an answer that is not a DP release (a public query)."""
        meta = _text_metadata(schema.metadata)
        raw = meta.get(RESULT)
        if raw is None:
            return None
        try:
            info = json.loads(raw)
            cost = info["cost_per_site"]
            release_cost = Cost(float(cost["rho"]), float(cost["epsilon"]), float(cost["delta"]))
            query_id = str(info["query_id"])
            sites = [str(s) for s in info.get("sites", [])]
            confidence = float(info.get("confidence", math.nan))
        except (ValueError, KeyError, TypeError) as e:
            raise InternalError(f"the coordinator sent an unreadable {RESULT}: {e}") from e
        missing = [s for s in (meta.get(MISSING_SITES) or "").split(",") if s.strip()]
        columns: dict[str, ColumnRelease] = {}
        for f in schema:
            fm = _text_metadata(f.metadata)
            if MECHANISM not in fm and INTERVAL not in fm:
                continue
            interval = None
            if fm.get(INTERVAL):
                parts = [p.strip() for p in fm[INTERVAL].split(",")]
                if len(parts) == 2:
                    interval = (parts[0], parts[1])
            columns[f.name] = ColumnRelease(
                column=f.name,
                mechanism=fm.get(MECHANISM),
                confidence=_float(fm.get(CONFIDENCE)),
                interval=interval,
                noise_stddev=_float(fm.get(NOISE_STDDEV)),
                interval_note=fm.get(INTERVAL_NOTE),
            )
        return cls(
            query_id=query_id,
            sites=sites,
            cost_per_site=release_cost,
            confidence=confidence,
            missing_sites=[s.strip() for s in missing],
            columns=columns,
        )


def _text_metadata(meta: dict[bytes, bytes] | None) -> dict[str, str]:
    return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in (meta or {}).items()}


def _float(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


class QueryResult:
    """A statement's answer: the rows and, for a DP query, its release.

    Attributes:
        df: The rows as a polars DataFrame: each DP value is followed by its
            ``<name>_ci_low`` and ``<name>_ci_high`` columns.
        arrow: The same rows as the coordinator sent them (a pyarrow Table,
            confer's metadata on its schema and fields).
        release: Cost per site, sites answered, mechanism, missing sites,
            confidence and per-column noise; ``None`` for a query of public
            tables, which is not a DP release.

    ``len(result)``, ``result.columns``, ``result["persons"]`` and
    ``result.shape`` read the DataFrame; in a notebook the result shows as
    its table with the release summary under it.
    """

    def __init__(self, table: pa.Table) -> None:
        self.arrow: pa.Table = table
        self.df: pl.DataFrame = _to_polars(table)
        self.release: Release | None = Release.from_schema(table.schema)

    @property
    def columns(self) -> list[str]:
        """The column names."""
        return self.df.columns

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns)."""
        return self.df.shape

    def __len__(self) -> int:
        return self.df.height

    def __getitem__(self, key: Any) -> Any:
        return self.df[key]

    def intervals(self) -> pl.DataFrame:
        """The DP values in long form, one row per group and value column:
        the group key columns, then ``column``, ``value``, ``ci_low``,
        ``ci_high`` (handy for plots with error bars)."""
        if self.release is None:
            raise InternalError("this answer is not a DP release: it has no intervals")
        with_interval = {c: r.interval for c, r in self.release.columns.items() if r.interval}
        interval_columns = {name for pair in with_interval.values() if pair for name in pair}
        keys = [c for c in self.df.columns if c not in self.release.columns and c not in interval_columns]
        parts = []
        for column, pair in with_interval.items():
            assert pair is not None
            low, high = pair
            parts.append(
                self.df.select(
                    *keys,
                    pl.lit(column).alias("column"),
                    pl.col(column).cast(pl.Float64).alias("value"),
                    pl.col(low).cast(pl.Float64).alias("ci_low"),
                    pl.col(high).cast(pl.Float64).alias("ci_high"),
                )
            )
        if not parts:
            return pl.DataFrame(
                schema={"column": pl.Utf8, "value": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64}
            )
        return pl.concat(parts, how="vertical_relaxed")

    def __repr__(self) -> str:
        text = repr(self.df)
        if self.release is not None:
            text += "\n" + self.release.summary()
        return text

    def _repr_html_(self) -> str:
        html = self.df._repr_html_()
        if self.release is not None:
            html += f"<p><small>{_escape(self.release.summary())}</small></p>"
        return html


def _to_polars(table: pa.Table) -> pl.DataFrame:
    # polars keeps no Arrow metadata; the Release holds it.
    frame = pl.from_arrow(table)
    if isinstance(frame, pl.Series):  # a single column comes back as a Series
        frame = frame.to_frame()
    return frame


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@dataclass(frozen=True)
class ExplainedAggregate:
    """One ``aggregate <name>`` row of EXPLAIN PRIVACY: one noisy partial.

    Attributes:
        name: The SELECT item (the aggregate's alias).
        partial: The partial's label (``p0``, ``sum``, ``n``, ...).
        expression: The aggregate as written.
        noise_stddev: The standard deviation of the noise as it reaches the
            released value (over every site; for private keys the largest
            possible), if the row states one.
        interval_half_width: Half the width of the value's interval at the
            query's confidence (so the interval is about value ± this).
        description: The whole row as the coordinator wrote it.
    """

    name: str
    partial: str | None
    expression: str
    noise_stddev: float | None
    interval_half_width: float | None
    description: str

    @property
    def interval_width(self) -> float | None:
        """The expected width of the interval (twice the half-width)."""
        return None if self.interval_half_width is None else 2 * self.interval_half_width


_NUMBER = r"([0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)"
_COST = re.compile(rf"epsilon = {_NUMBER}(?:, delta = {_NUMBER})?(?:, rho \(zCDP\) = {_NUMBER})?")
_AGGREGATE = re.compile(r"^(?P<expr>.*?)(?: \[(?P<partial>[^\]]+)\])?: (?P<rest>.*)$", re.S)
_HALF_WIDTH = re.compile(rf"interval \+/- {_NUMBER}")
_STDDEV = re.compile(rf"standard deviation {_NUMBER}")
_OVER = re.compile(rf"at most {_NUMBER} over")


class Explanation:
    """The answer to ``EXPLAIN PRIVACY <DP query>``: what the query would
    cost and how wide its intervals would be. Nothing is sent to the nodes
    and nothing is spent.

    Attributes:
        df: The rows as the coordinator sent them (``item``, ``value``).
        mechanism: ``"gaussian"`` or ``"laplace"``.
        cost_per_site: What the query would cost at each site (``None`` if
            the row is missing).
        aggregates: One entry per noisy partial, with the expected noise
            and interval half-width.
        local_query: The bounded SQL each node would run.
    """

    def __init__(self, table: pa.Table) -> None:
        meta = _text_metadata(table.schema.metadata)
        if meta.get(EXPLAIN) != "true" or table.column_names[:2] != ["item", "value"]:
            raise InternalError("the coordinator's EXPLAIN PRIVACY answer has an unexpected shape")
        self.df: pl.DataFrame = _to_polars(table)
        rows = list(zip(table.column("item").to_pylist(), table.column("value").to_pylist(), strict=True))
        self.items: list[tuple[str, str]] = [(str(i), str(v or "")) for i, v in rows]
        found = dict(self.items)
        self.mechanism: str | None = found.get("mechanism")
        self.cost_per_site: Cost | None = _parse_cost(found.get("cost per node"))
        self.local_query: str | None = found.get("local bounded query")
        self.aggregates: list[ExplainedAggregate] = [
            _parse_aggregate(item[len("aggregate ") :], value)
            for item, value in self.items
            if item.startswith("aggregate ")
        ]

    def widths(self) -> pl.DataFrame:
        """The expected accuracy per noisy partial: ``aggregate``,
        ``partial``, ``noise_stddev``, ``interval_half_width``,
        ``interval_width``."""
        return pl.DataFrame(
            {
                "aggregate": [a.name for a in self.aggregates],
                "partial": [a.partial for a in self.aggregates],
                "noise_stddev": [a.noise_stddev for a in self.aggregates],
                "interval_half_width": [a.interval_half_width for a in self.aggregates],
                "interval_width": [a.interval_width for a in self.aggregates],
            },
            schema={
                "aggregate": pl.Utf8,
                "partial": pl.Utf8,
                "noise_stddev": pl.Float64,
                "interval_half_width": pl.Float64,
                "interval_width": pl.Float64,
            },
        )

    def __str__(self) -> str:
        lines = []
        for item, value in self.items:
            value = value.replace("\n", "\n" + " " * 21)
            lines.append(f"{item:<20} {value}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)


def _parse_cost(text: str | None) -> Cost | None:
    if not text:
        return None
    m = _COST.search(text)
    if not m:
        return None
    epsilon = float(m.group(1))
    delta = float(m.group(2)) if m.group(2) else 0.0
    rho = float(m.group(3)) if m.group(3) else math.nan
    return Cost(rho=rho, epsilon=epsilon, delta=delta)


def _parse_aggregate(name: str, text: str) -> ExplainedAggregate:
    m = _AGGREGATE.match(text)
    expression = m.group("expr") if m else text
    partial = m.group("partial") if m else None
    half = _HALF_WIDTH.search(text)
    # The last standard deviation named is the one the interval uses (over
    # every site, or at the quoted number of contributors); for private
    # keys the "at most ... over" figure.
    over = _OVER.search(text)
    stddevs = _STDDEV.findall(text)
    stddev = float(over.group(1)) if over else (float(stddevs[-1]) if stddevs else None)
    if "secure sum" in text and stddevs:
        stddev = float(stddevs[0])
    return ExplainedAggregate(
        name=name,
        partial=partial,
        expression=expression,
        noise_stddev=stddev,
        interval_half_width=float(half.group(1)) if half else None,
        description=text,
    )
