"""Federated training jobs: submit, follow, read metrics, cancel, export.

A job runs at the coordinator (``docs/training.md``); a :class:`Job` is a
handle on it. Following it polls ``confer.train.status``; stopping to
follow (Ctrl-C, a timeout) does not stop the job: :meth:`Job.cancel` does.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Union

import polars as pl

from .errors import ConfigurationError, DeadlineExceededError, JobFailedError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

if TYPE_CHECKING:
    from .client import Client

__all__ = ["Job", "JobSpecInput", "JobStatus", "load_job_spec"]

#: What :meth:`confer.Client.train` takes: a dict, a TOML file path, or TOML text.
JobSpecInput = Union[Mapping[str, Any], str, "os.PathLike[str]"]

FINAL_STATES = ("finished", "failed", "cancelled")


def load_job_spec(job: JobSpecInput) -> dict[str, Any]:
    """A job spec as the coordinator takes it (JSON of the TOML format),
    from a dict, a path to a TOML file, or TOML text. As ``confer train``
    does, ``model.inputs`` defaults to the number of ``data.features``.

    Raises:
        ConfigurationError: The file cannot be read or is not TOML.
    """
    if isinstance(job, Mapping):
        try:
            spec: dict[str, Any] = json.loads(json.dumps(job))  # a deep, JSON-safe copy
        except (TypeError, ValueError) as e:
            raise ConfigurationError(f"the job dict is not JSON-serialisable: {e}") from None
    elif isinstance(job, (str, os.PathLike)):
        text: str
        where: str
        if isinstance(job, os.PathLike) or ("\n" not in job and "=" not in job):
            path = Path(job)
            try:
                text = path.read_text()
            except OSError as e:
                raise ConfigurationError(f"cannot read the job file {path}: {e.strerror}") from None
            where = str(path)
        else:
            text = job
            where = "the job text"
        try:
            spec = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigurationError(f"{where} is not valid TOML: {e}") from None
    else:
        raise ConfigurationError(
            f"a job is a dict, a path to a job TOML file or TOML text, not {type(job).__name__}"
        )
    data = spec.get("data")
    model = spec.get("model")
    if isinstance(data, dict) and isinstance(model, dict) and "inputs" not in model:
        features = data.get("features")
        if isinstance(features, list):
            model["inputs"] = len(features)
    return spec


def _time(ms: Any) -> datetime | None:
    from .client import _time as convert

    return convert(ms)


@dataclass(frozen=True)
class JobStatus:
    """Where a training job stands (``confer.train.status``).

    Attributes:
        job_id: The job.
        name: Its name.
        study: Its study.
        owner: Who submitted it.
        state: ``preparing``, ``running``, ``finished``, ``failed`` or ``cancelled``.
        round: Rounds completed.
        rounds: Rounds asked for.
        sites: The nodes it trains at.
        created: When it was submitted.
        updated: When it last changed.
        error: Why it failed.
        notes: Notes along the way.
        history: The rounds so far, as the coordinator reports them (see
            :meth:`Job.metrics` for a table).
        privacy: The privacy statement (``summary`` is one readable line).
    """

    job_id: str
    name: str
    study: str
    owner: str
    state: str
    round: int
    rounds: int
    sites: list[str]
    created: datetime | None
    updated: datetime | None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    privacy: dict[str, Any] | None = None

    @property
    def is_final(self) -> bool:
        """Whether the job will not change any more."""
        return self.state in FINAL_STATES

    @property
    def privacy_summary(self) -> str | None:
        """The privacy statement in one paragraph."""
        if self.privacy and isinstance(self.privacy.get("summary"), str):
            return str(self.privacy["summary"])
        return None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobStatus:
        """Reads the coordinator's JSON."""
        return cls(
            job_id=str(data["job_id"]),
            name=str(data.get("name", "")),
            study=str(data.get("study", "")),
            owner=str(data.get("owner", "")),
            state=str(data.get("state", "")),
            round=int(data.get("round", 0)),
            rounds=int(data.get("rounds", 0)),
            sites=[str(s) for s in data.get("sites") or []],
            created=_time(data.get("created_ms")),
            updated=_time(data.get("updated_ms")),
            error=data.get("error"),
            notes=[str(n) for n in data.get("notes") or []],
            history=list(data.get("history") or []),
            privacy=data.get("privacy"),
        )


def describe_round(record: Mapping[str, Any]) -> str:
    """One line per round, as ``confer train`` prints it."""
    line = f"round {record.get('round', 0):>3}: "
    contributors = record.get("contributors") or []
    if not contributors:
        line += "failed"
    else:
        line += (
            f"{len(contributors)} nodes, update norm {float(record.get('update_norm', 0.0)):.4f}, "
            f"local {float(record.get('local_secs', 0.0)):.2f}s, "
            f"secagg {float(record.get('secagg_secs', 0.0)):.2f}s, "
            f"server {float(record.get('server_secs', 0.0)):.3f}s"
        )
    clipped = record.get("clipped")
    if clipped:
        line += f", {clipped:.0f} updates clipped"
    dropped = record.get("dropped") or []
    if dropped:
        line += ", dropped: " + ", ".join(str(d[0]) for d in dropped)
    for m in record.get("evaluation") or []:
        if m.get("site") == "overall":

            def f(v: Any) -> str:
                return "-" if v is None else f"{float(v):.3f}"

            line += f" | accuracy {f(m.get('accuracy'))}, AUC {f(m.get('auc'))}, loss {f(m.get('loss'))}"
    return line


_METRIC_SCHEMA: dict[str, Any] = {
    "round": pl.Int64,
    "site": pl.Utf8,
    "examples": pl.Float64,
    "loss": pl.Float64,
    "accuracy": pl.Float64,
    "auc": pl.Float64,
    "noise_stddev": pl.Float64,
    "contributors": pl.Int64,
    "dropped": pl.Int64,
    "clipped": pl.Float64,
    "update_norm": pl.Float64,
    "local_secs": pl.Float64,
    "secagg_secs": pl.Float64,
    "server_secs": pl.Float64,
}


def metrics_frame(status: JobStatus) -> pl.DataFrame:
    """The job's history as ``confer train`` writes ``metrics.csv``: one row
    per round and evaluated site (``site`` is ``"overall"`` for the whole
    network, null for a round without evaluation)."""
    rows: dict[str, list[Any]] = {k: [] for k in _METRIC_SCHEMA}
    for r in status.history:
        common = {
            "round": int(r.get("round", 0)),
            "contributors": len(r.get("contributors") or []),
            "dropped": len(r.get("dropped") or []),
            "clipped": r.get("clipped"),
            "update_norm": r.get("update_norm"),
            "local_secs": r.get("local_secs"),
            "secagg_secs": r.get("secagg_secs"),
            "server_secs": r.get("server_secs"),
        }
        evaluations = r.get("evaluation") or [None]
        for m in evaluations:
            m = m or {}
            row = dict(common)
            row.update(
                site=m.get("site"),
                examples=m.get("examples"),
                loss=m.get("loss"),
                accuracy=m.get("accuracy"),
                auc=m.get("auc"),
                noise_stddev=m.get("noise_stddev"),
            )
            for k in rows:
                rows[k].append(row.get(k))
    return pl.DataFrame(rows, schema=_METRIC_SCHEMA)


class _Progress:
    """A progress bar on standard error, or plain lines where it is no
    terminal (a notebook, a log file)."""

    def __init__(self, total: int, stream: IO[str] | None = None, bar: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total = max(total, 1)
        isatty = getattr(self.stream, "isatty", None)
        self.bar = bool(isatty and isatty()) if bar is None else bar
        self.start = time.monotonic()
        self.drawn = False
        self.last_text = ""

    def line(self, text: str) -> None:
        if self.bar and self.drawn:
            self.stream.write("\r\x1b[2K")
        self.stream.write(text + "\n")
        self.drawn = False
        self.stream.flush()

    def update(self, done: int, state: str) -> None:
        elapsed = int(time.monotonic() - self.start)
        clock = f"{elapsed // 3600:02}:{elapsed // 60 % 60:02}:{elapsed % 60:02}"
        if self.bar:
            width = 30
            filled = min(width, int(width * done / self.total))
            arrow = ">" if filled < width else ""
            body = "=" * filled + arrow + " " * (width - filled - len(arrow))
            self.stream.write(f"\r\x1b[2Kround {done}/{self.total} [{body}] {clock} {state}")
            self.drawn = True
            self.stream.flush()
        elif state != self.last_text:
            # Plain lines: one per state change (the rounds have their own).
            self.last_text = state
            self.line(f"{state} at round {done}/{self.total} ({clock})")

    def close(self) -> None:
        if self.bar and self.drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self.drawn = False


class Job:
    """A training job at the coordinator. Get one from
    :meth:`confer.Client.train` or :meth:`confer.Client.job`.

    Attributes:
        id: The job id.
        spec: The spec it was submitted with, when this client submitted it.
    """

    def __init__(
        self,
        client: Client,
        job_id: str,
        *,
        status: JobStatus | None = None,
        spec: dict[str, Any] | None = None,
    ) -> None:
        self._client = client
        self.id: str = job_id
        self.spec: dict[str, Any] | None = spec
        self._status = status

    def __repr__(self) -> str:
        state = self._status.state if self._status else "?"
        return f"<confer.Job {self.id} {state}>"

    @property
    def last_status(self) -> JobStatus | None:
        """The status last fetched (no call)."""
        return self._status

    @property
    def privacy(self) -> dict[str, Any] | None:
        """The job's privacy statement (``["summary"]`` reads as a paragraph)."""
        status = self._status or self.status()
        return status.privacy

    def status(self) -> JobStatus:
        """The job's status and history now."""
        self._status = JobStatus.from_json(self._client.action("confer.train.status", {"job_id": self.id}))
        return self._status

    def cancel(self) -> JobStatus:
        """Stops the job after the step under way; returns its status."""
        self._status = JobStatus.from_json(self._client.action("confer.train.cancel", {"job_id": self.id}))
        return self._status

    def wait(
        self,
        *,
        progress: bool = True,
        timeout: float | None = 3600.0,
        poll_interval: float = 0.5,
        raise_on_failure: bool = True,
        stream: IO[str] | None = None,
    ) -> JobStatus:
        """Follows the job until it finishes, fails or is cancelled.

        Args:
            progress: Show progress on standard error (or ``stream``): a bar
                with a line per round on a terminal, plain lines elsewhere.
            timeout: Seconds to follow before giving up (the job goes on at
                the coordinator); ``None`` waits as long as it takes.
            poll_interval: Seconds between status calls.
            raise_on_failure: Raise :class:`~confer.JobFailedError` if the
                job fails (else return its status).
            stream: Where progress goes (default: ``sys.stderr``).

        Returns:
            The final :class:`JobStatus`.

        Raises:
            JobFailedError: The job failed (with every node's reason).
            DeadlineExceededError: It did not end within ``timeout``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        status = self.status()
        bar = _Progress(status.rounds, stream) if progress else None
        shown = 0
        try:
            if bar and status.privacy_summary:
                bar.line(f"job {self.id}: {status.rounds} rounds at {', '.join(status.sites)}")
                bar.line(f"privacy: {status.privacy_summary}")
            while True:
                if bar:
                    for record in status.history[shown:]:
                        bar.line(describe_round(record))
                    bar.update(status.round, status.state)
                shown = len(status.history)
                if status.is_final:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise DeadlineExceededError(
                        f"job {self.id} did not end within {timeout:g} s (it is {status.state}, "
                        f"round {status.round}/{status.rounds}); it goes on at the coordinator: "
                        "wait() again, or cancel() it",
                        code="DEADLINE_EXCEEDED",
                    )
                time.sleep(poll_interval)
                status = self.status()
        finally:
            if bar:
                bar.close()
        if bar:
            for note in status.notes:
                bar.line(f"note: {note}")
            bar.line(f"job {self.id} {status.state} after {status.round} rounds")
        if status.state == "failed" and raise_on_failure:
            raise JobFailedError(f"job {self.id} failed: {status.error or 'no reason recorded'}", status)
        return status

    def metrics(self) -> pl.DataFrame:
        """Every round so far as a DataFrame (the columns of ``confer
        train``'s ``metrics.csv``): ``round``, ``site``, ``examples``,
        ``loss``, ``accuracy``, ``auc``, ``noise_stddev`` (per evaluated
        site and ``overall``; the counts behind them are DP), then
        ``contributors``, ``dropped``, ``clipped``, ``update_norm`` and
        the timings."""
        return metrics_frame(self.status())

    def export(self, path: str | os.PathLike[str] = "model.safetensors") -> Path:
        """Writes the job's latest model as ``confer model export`` does:
        the weights (safetensors, at ``path``), the spec beside them
        (``<stem>.spec.json``) and ``<stem>.job.json`` with the features,
        the standardisation, the privacy statement (and the features'
        bounds, when this client submitted the job). Load it with
        :func:`confer.load_torch_model`.

        Returns:
            The weights' path.

        Raises:
            RefusedError: The job has no model yet.
        """
        from .models import write_export

        if not str(path).endswith(".safetensors"):
            raise ConfigurationError("weights files are safetensors: give the path a .safetensors extension")
        export = self._client.action("confer.model.export", {"job_id": self.id})
        bounds = None
        if self.spec is not None:
            data = self.spec.get("data") or {}
            if isinstance(data.get("bounds"), Mapping):
                bounds = {str(k): [float(v[0]), float(v[1])] for k, v in data["bounds"].items()}
        return write_export(export, Path(path), bounds=bounds)
