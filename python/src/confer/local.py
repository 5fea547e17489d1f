"""A confer federation on this machine, for tutorials and tests.

:func:`local_network` starts a coordinator and its nodes on loopback
ports, as child processes of the ``confer`` binary, and stops them when
the ``with`` block ends:

* ``dataset="gibleed"`` (default): ``confer demo --serve`` over the OHDSI
  GiBleed OMOP data, split by person into ``sites`` sites; user
  ``researcher`` in study ``demo`` (a budget of epsilon 50 at each node).
  Its nodes do not allow training.
* ``dataset="heart"``: the four UCI heart-disease hospitals
  (``examples/datasets/uci-heart``) with a policy that allows training
  (logistic regression and MLPs; also without DP noise on the updates, as
  in ``confer demo``'s training step), study ``demo``.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .client import Client, connect
from .errors import ConferError, LocalNetworkError

__all__ = ["LocalNetwork", "find_binary", "local_network"]

#: Centre name → data file name, as in examples/datasets/uci-heart.
HEART_CENTRES = {
    "cleveland": "processed.cleveland.data",
    "hungary": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va-long-beach": "processed.va.data",
}

#: The nodes' policy in ``dataset="heart"`` (as ``confer demo``'s training step).
HEART_POLICY = """[policy]
approval = "auto"
max_query_epsilon = 5.0

[policy.studies.demo]
budget = { epsilon = 20.0, delta = 1e-5 }
models = ["logistic_regression", "mlp"]
# Updates without DP noise (only secure-aggregated) are allowed here, as in
# `confer demo`; jobs with dp_training = true work as well.
allow_non_dp_training = true
"""


def _repo_roots() -> list[Path]:
    """Directories that may be the confer checkout: above the working
    directory and above this package (an editable install)."""
    seen: list[Path] = []
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for p in (start, *start.parents):
            if (p / "Cargo.toml").is_file() and (p / "cli").is_dir() and p not in seen:
                seen.append(p)
    return seen


def find_binary(binary: str | os.PathLike[str] | None = None) -> Path:
    """The ``confer`` executable: ``binary`` if given, else ``CONFER_BIN``,
    else ``confer`` on ``PATH``, else a cargo build of the checkout
    (``$CARGO_TARGET_DIR``, ``~/.cache/confer/target`` as the Makefile
    builds it, ``<checkout>/target``; debug, then release).

    Raises:
        LocalNetworkError: None of them exists.
    """
    tried: list[str] = []
    if binary is not None:
        path = Path(binary)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise LocalNetworkError(f"the confer binary {path} does not exist or is not executable")
    env = os.environ.get("CONFER_BIN")
    if env:
        path = Path(env)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        tried.append(f"CONFER_BIN={env} (missing)")
    on_path = shutil.which("confer")
    if on_path:
        return Path(on_path)
    tried.append("confer on PATH")
    targets = []
    if os.environ.get("CARGO_TARGET_DIR"):
        targets.append(Path(os.environ["CARGO_TARGET_DIR"]))
    targets.append(Path.home() / ".cache" / "confer" / "target")
    targets.extend(root / "target" for root in _repo_roots())
    for target in targets:
        for profile in ("debug", "release"):
            path = target / profile / "confer"
            if path.is_file() and os.access(path, os.X_OK):
                return path
            tried.append(str(path))
    raise LocalNetworkError(
        "cannot find the confer binary: build it with `make build` (or `cargo build --bin confer`), "
        "or set CONFER_BIN to it. Tried: " + "; ".join(tried)
    )


class _Child:
    """A child process whose standard output is read line by line on a
    thread (so waiting for a line can time out)."""

    def __init__(
        self, label: str, argv: Sequence[str], *, log: Path | None = None, stdin: bool = False
    ) -> None:
        self.label = label
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._log: IO[bytes] | None = open(log, "wb") if log else None
        try:
            self.proc = subprocess.Popen(
                list(argv),
                stdout=subprocess.PIPE,
                stderr=self._log if self._log else subprocess.STDOUT,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                text=True,
                bufsize=1,
                start_new_session=True,
            )
        except OSError as e:
            if self._log:
                self._log.close()
            raise LocalNetworkError(f"cannot start {label} ({argv[0]}): {e.strerror}") from None
        self.log_path = log
        self._reader = threading.Thread(target=self._read, name=f"confer {label} output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: re.Pattern[str], deadline: float) -> re.Match[str]:
        """The first line matching ``pattern``; fails at ``deadline`` or
        when the process ends."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LocalNetworkError(f"{self.label} did not start in time:\n{self.output()}")
            try:
                line = self._queue.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=10)
                raise LocalNetworkError(
                    f"{self.label} exited with status {self.proc.returncode} while starting:\n{self.output()}"
                )
            match = pattern.search(line)
            if match:
                return match

    def output(self) -> str:
        text = "".join(self.lines)
        if self.log_path and self.log_path.is_file():
            log = self.log_path.read_text(errors="replace")
            if log.strip():
                text += f"\n[{self.label} log]\n{log}"
        return text

    def stop(self, grace: float, *, interrupt: bool) -> bool:
        """Stops the process: SIGINT (``interrupt``) or closing its standard
        input; kills it after ``grace`` seconds. True if it exited 0 in time."""
        clean = False
        if self.proc.poll() is None:
            try:
                if interrupt:
                    self.proc.send_signal(signal.SIGINT)
                elif self.proc.stdin:
                    self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=grace)
                clean = self.proc.returncode == 0
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        else:
            clean = self.proc.returncode == 0
        self._reader.join(timeout=5)
        if self._log:
            self._log.close()
            self._log = None
        return clean


@dataclass
class LocalNetwork:
    """A running local federation (see :func:`local_network`).

    Attributes:
        dataset: ``"gibleed"`` or ``"heart"``.
        url: The coordinator's URL (``http://127.0.0.1:PORT``).
        token: The researcher's bearer token (user ``researcher``).
        admin_token: The admin's bearer token (user ``admin``).
        study: The study the researcher may use (``"demo"``).
        sites: The nodes' site names.
        work_dir: Configs, split data, ledgers and logs.
        console_url: The coordinator's web console (``docs/console.md``),
            where the researcher and admin sign in with their tokens.
    """

    dataset: str
    url: str
    token: str
    admin_token: str
    study: str
    sites: list[str]
    work_dir: Path
    console_url: str | None = None
    _children: list[_Child] = field(default_factory=list, repr=False)
    _clients: list[Client] = field(default_factory=list, repr=False)
    _client: Client | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        """``host:port`` of the coordinator."""
        return self.url.split("://", 1)[1]

    @property
    def client(self) -> Client:
        """A client connected as ``researcher`` under the study (made on
        first use, closed when the network stops)."""
        if self._client is None or self._client.closed:
            self._client = self.connect()
        return self._client

    def connect(self, user: str = "researcher", **kwargs: Any) -> Client:
        """A new client connected as ``user`` (``researcher`` or ``admin``);
        ``kwargs`` go to :func:`confer.connect` (``study`` defaults to the
        network's). It is closed when the network stops."""
        tokens = {"researcher": self.token, "admin": self.admin_token}
        if user not in tokens:
            raise LocalNetworkError(f"the local network has no user {user}: researcher or admin")
        kwargs.setdefault("study", self.study)
        client = connect(self.url, token=tokens[user], **kwargs)
        self._clients.append(client)
        return client

    def output(self) -> str:
        """What the processes printed so far."""
        return "\n".join(f"--- {c.label}\n{c.output()}" for c in self._children)

    def stop(self, grace: float = 30.0) -> None:
        """Stops the federation (clients first, then the coordinator, then
        the nodes). Idempotent.

        Raises:
            LocalNetworkError: A process did not exit cleanly (its output
                is in the message).
        """
        if self._stopped:
            return
        self._stopped = True
        for client in self._clients:
            client.close()
        failed = []
        for child in self._children:
            interrupt = child.proc.stdin is None
            if not child.stop(grace, interrupt=interrupt):
                failed.append(child)
        if self.dataset == "gibleed" and self._children and not failed:
            if "federation stopped cleanly" not in self._children[0].output():
                failed.append(self._children[0])
        if failed:
            raise LocalNetworkError(
                "the local network did not stop cleanly:\n"
                + "\n".join(f"--- {c.label} (exit {c.proc.returncode})\n{c.output()}" for c in failed)
            )


@contextmanager
def local_network(
    dataset: str = "gibleed",
    *,
    sites: int = 3,
    binary: str | os.PathLike[str] | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    timeout: float = 180.0,
    training_demo: bool = False,
) -> Iterator[LocalNetwork]:
    """Starts a confer federation on loopback for the ``with`` block and
    stops it cleanly afterwards (SIGINT, as Ctrl-C would).

    Example::

        with confer.local_network() as net:
            result = net.client.sql("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS "
                                    "(epsilon = 1, delta = 1e-6) COUNT(*) AS persons FROM person")
            print(result.df)

    Args:
        dataset: ``"gibleed"`` (``confer demo --serve``: OMOP GiBleed split
            by person) or ``"heart"`` (the four UCI heart-disease
            hospitals, with training allowed).
        sites: How many sites GiBleed is split into.
        binary: The ``confer`` executable (see :func:`find_binary`).
        work_dir: An empty or new directory for configs, data splits and
            ledgers (default: a temporary directory, removed afterwards).
        data_dir: The data: GiBleed's CSV directory, or the directory of the
            UCI ``processed.*.data`` files (default: where the checkout's
            ``../shared/data`` keeps them).
        timeout: Seconds the federation may take to come up.
        training_demo: For GiBleed, also run ``confer demo``'s scripted
            training step before serving (slower).

    Yields:
        A :class:`LocalNetwork`: ``url``, ``token``, ``admin_token``,
        ``study``, ``client`` (connected as the researcher), ``connect()``.

    Raises:
        LocalNetworkError: The binary or the data is missing, or the
            federation did not come up within ``timeout`` (the message
            holds what its processes printed).
    """
    if dataset not in ("gibleed", "heart"):
        raise LocalNetworkError(f"unknown dataset {dataset!r}: 'gibleed' or 'heart'")
    program = find_binary(binary)
    temp: tempfile.TemporaryDirectory[str] | None = None
    if work_dir is None:
        temp = tempfile.TemporaryDirectory(prefix="confer-local-")
        root = Path(temp.name)
    else:
        root = Path(work_dir)
        if root.exists() and any(root.iterdir()):
            raise LocalNetworkError(f"work_dir {root} is not empty: choose an empty or new directory")
        root.mkdir(parents=True, exist_ok=True)
    net: LocalNetwork | None = None
    children: list[_Child] = []
    try:
        deadline = time.monotonic() + timeout
        if dataset == "gibleed":
            net = _start_gibleed(program, root, sites, data_dir, deadline, training_demo, children)
        else:
            net = _start_heart(program, root, data_dir, deadline, children)
        failed = False
        try:
            yield net
        except BaseException:
            failed = True
            raise
        finally:
            try:
                net.stop()
            except LocalNetworkError:
                if not failed:
                    raise
    finally:
        if net is None:
            for child in reversed(children):
                child.stop(10, interrupt=child.proc.stdin is None)
        if temp is not None:
            temp.cleanup()


_COORDINATOR = re.compile(r"Coordinator: (http://[0-9.]+:[0-9]+)")
_TOKEN = re.compile(r"export CONFER_TOKEN=(\S+)")
_ADMIN = re.compile(r"Admin token \(user `admin`\): (\S+)")
_READY = re.compile(r"Press Ctrl-C to stop\.")
_SITES = re.compile(r"federation up: coordinator at \S+, nodes (.*)$")


def _find_data(data_dir: str | os.PathLike[str] | None, relative: str, marker: str) -> Path | None:
    if data_dir is not None:
        path = Path(data_dir)
        if not (path / marker).is_file():
            raise LocalNetworkError(f"{path} holds no {marker}")
        return path.resolve()
    for root in _repo_roots():
        path = root.parent / "shared" / "data" / relative
        if (path / marker).is_file():
            return path
    return None


def _start_gibleed(
    program: Path,
    root: Path,
    sites: int,
    data_dir: str | os.PathLike[str] | None,
    deadline: float,
    training_demo: bool,
    children: list[_Child],
) -> LocalNetwork:
    argv = [str(program), "demo", "--serve", "--trend-months", "0", "--work-dir", str(root / "demo"), "--sites", str(sites)]
    data = _find_data(data_dir, "eunomia_gibleed/csv", "PERSON.csv")
    if data is not None:
        argv += ["--data", str(data)]
    if not training_demo:
        argv.append("--no-training")
    child = _Child("confer demo --serve", argv)
    children.append(child)
    child.wait_for(_READY, deadline)
    text = child.output()
    found = {}
    for key, pattern in (("url", _COORDINATOR), ("token", _TOKEN), ("admin", _ADMIN)):
        match = pattern.search(text)
        if not match:
            raise LocalNetworkError(f"confer demo printed no {key}:\n{text}")
        found[key] = match.group(1)
    names: list[str] = []
    for line in child.lines:
        match = _SITES.search(line)
        if match:
            names = [part.split(" (")[0].strip() for part in match.group(1).split(", ")]
    console = _WEB_CONSOLE.search(text)
    return LocalNetwork(
        dataset="gibleed",
        url=found["url"],
        console_url=console.group(1) if console else None,
        token=found["token"],
        admin_token=found["admin"],
        study="demo",
        sites=names,
        work_dir=root,
        _children=children,
    )


def _run(program: Path, args: Sequence[str], what: str, timeout: float = 60.0) -> str:
    try:
        done = subprocess.run(
            [str(program), *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as e:
        raise LocalNetworkError(f"{what} did not finish within {timeout:g} s: {e.output or ''}") from None
    if done.returncode != 0:
        raise LocalNetworkError(f"{what} failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


def _heart_examples() -> Path:
    for root in _repo_roots():
        path = root / "examples" / "datasets" / "uci-heart"
        if (path / "cleveland.toml").is_file():
            return path
    raise LocalNetworkError(
        "cannot find examples/datasets/uci-heart (the heart-disease node configs): "
        "run from inside the confer checkout"
    )


_LISTENING = re.compile(r" listening on (\S+)\s*$")
_CONSOLE = re.compile(r" console at (\S+)\s*$", re.M)
_WEB_CONSOLE = re.compile(r"^Web console \(.*\): (\S+)\s*$", re.M)


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _start_heart(
    program: Path,
    root: Path,
    data_dir: str | os.PathLike[str] | None,
    deadline: float,
    children: list[_Child],
) -> LocalNetwork:
    examples = _heart_examples()
    data = _find_data(data_dir, "uci_heart_disease", "processed.cleveland.data")
    _run(program, ["keygen", "--out", str(root / "coordinator.key")], "confer keygen")
    coordinator_key = (root / "coordinator.key.pub").read_text().strip()
    identities: dict[str, str] = {}
    for centre in HEART_CENTRES:
        key = root / "state" / centre / "secagg.key"
        key.parent.mkdir(parents=True, exist_ok=True)
        _run(program, ["keygen", "--out", str(key)], "confer keygen")
        identities[centre] = Path(f"{key}.pub").read_text().strip()
    peers = "\n# Peers' secure-aggregation keys, pinned by local_network().\n[policy.secure.peers]\n"
    peers += "".join(f"{_toml_string(n)} = {_toml_string(k)}\n" for n, k in identities.items())
    configs = {}
    for centre, file_name in HEART_CENTRES.items():
        example = (examples / f"{centre}.toml").read_text()
        start = example.find("[tables.heart]")
        if start < 0:
            raise LocalNetworkError(f"{examples / f'{centre}.toml'} has no [tables.heart]")
        tables = example[start:]
        source = (data / file_name) if data is not None else None
        if source is None:
            match = re.search(r'^path = "(.*)"$', tables, re.M)
            source = (examples / match.group(1)).resolve() if match else None
        if source is None or not source.is_file():
            raise LocalNetworkError(
                f"cannot find the UCI heart-disease data for {centre} ({file_name}): pass data_dir="
            )
        path_line = f"path = {_toml_string(str(source))}"
        # (a replacement string: its backslashes doubled)
        tables = re.sub(r'^path = ".*"$', path_line.replace("\\", "\\\\"), tables, count=1, flags=re.M)
        text = (
            "# Written by confer.local_network(dataset='heart').\n[node]\n"
            f'name = {_toml_string(centre)}\nlisten = "127.0.0.1:0"\n'
            f"state_dir = {_toml_string(str(root / 'state' / centre))}\n"
            f"coordinator_key = {_toml_string(coordinator_key)}\n\n"
            f"{HEART_POLICY}{peers}\n{tables}"
        )
        path = root / f"{centre}.toml"
        path.write_text(text)
        configs[centre] = path
    env_log = root / "logs"
    env_log.mkdir()
    urls = {}
    for centre, path in configs.items():
        child = _Child(
            f"node {centre}",
            [str(program), "node", "--config", str(path), "--insecure-loopback", "--stop-on-stdin-eof"],
            log=env_log / f"{centre}.log",
            stdin=True,
        )
        children.append(child)
    for child, centre in zip(children, configs, strict=True):
        urls[centre] = "http://" + child.wait_for(_LISTENING, deadline).group(1)
    coordinator = root / "coordinator.toml"
    text = (
        "# Written by confer.local_network(dataset='heart').\n[coordinator]\n"
        'listen = "127.0.0.1:0"\nsigning_key = "coordinator.key"\n'
        'state = "state/coordinator.sqlite"\nmax_sites_per_person = 1\nnode_timeout_secs = 60\n'
        '\n[console]\nlisten = "127.0.0.1:0"\n'
    )
    for centre, url in urls.items():
        text += f"\n[[nodes]]\nname = {_toml_string(centre)}\nurl = {_toml_string(url)}\n"
    coordinator.write_text(text)
    tokens = {}
    for user, role in (("admin", "admin"), ("researcher", "researcher")):
        out = _run(
            program,
            ["coordinator", "user", "add", "--config", str(coordinator), "--name", user, "--role", role],
            f"confer coordinator user add --name {user}",
        )
        lines = [line.strip() for line in out.splitlines() if line.strip()]
        if not lines:
            raise LocalNetworkError(f"confer coordinator user add printed no token for {user}")
        tokens[user] = lines[-1]
    child = _Child(
        "coordinator",
        [
            str(program),
            "coordinator",
            "--config",
            str(coordinator),
            "--insecure-loopback",
            "--stop-on-stdin-eof",
        ],
        log=env_log / "coordinator.log",
        stdin=True,
    )
    # Stopped first: children stop in list order.
    children.insert(0, child)
    url = "http://" + child.wait_for(_LISTENING, deadline).group(1)
    console = _CONSOLE.search(child.output())
    net = LocalNetwork(
        dataset="heart",
        url=url,
        console_url=console.group(1) if console else None,
        token=tokens["researcher"],
        admin_token=tokens["admin"],
        study="demo",
        sites=list(HEART_CENTRES),
        work_dir=root,
        _children=children,
    )
    try:
        with connect(url, token=tokens["admin"], timeout=30) as admin:
            admin.action(
                "confer.study.create",
                {
                    "name": "demo",
                    "title": "demo (created by confer.local_network)",
                    "principal_investigator": "researcher",
                    "members": ["researcher"],
                    "tables": [],
                    "requested_epsilon": 20.0,
                    "requested_delta": 1e-5,
                    "ethics_ref": "LOCAL-0001",
                },
            )
    except ConferError as e:
        raise LocalNetworkError(f"cannot create study demo: {e}\n{net.output()}") from None
    return net
