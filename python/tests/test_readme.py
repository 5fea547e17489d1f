"""The READMEs' five-line example runs as written against a federation
like `make demo-serve`'s, configured as the READMEs say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

import confer

REPO = Path(__file__).resolve().parents[2]


def example(readme: Path) -> str:
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    five = [b for b in blocks if "confer.connect(study=" in b]
    assert five, f"{readme} has no five-line example"
    return str(five[0])


def test_the_readmes_show_the_same_example() -> None:
    code = example(REPO / "README.md")
    assert code == example(REPO / "python" / "README.md")
    assert len(code.strip().splitlines()) == 5


def test_the_five_line_example_prints_a_dataframe_with_intervals(
    network: confer.LocalNetwork, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONFER_COORDINATOR", network.url)
    monkeypatch.setenv("CONFER_TOKEN", network.token)
    monkeypatch.delenv("CONFER_STUDY", raising=False)
    out = io.StringIO()
    scope: dict[str, object] = {}
    with contextlib.redirect_stdout(out):
        exec(compile(example(REPO / "README.md"), "README.md", "exec"), scope)
    text = out.getvalue()
    assert "persons_ci_low" in text and "persons_ci_high" in text and "shape: (2, 4)" in text
    assert "Cost at each site: epsilon = 1.0000, delta = 1e-6" in text and "Mechanism: gaussian." in text
    client = scope["client"]
    assert isinstance(client, confer.Client)
    client.close()


def test_connect_reads_the_cli_environment(
    network: confer.LocalNetwork, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONFER_COORDINATOR", network.url)
    monkeypatch.setenv("CONFER_TOKEN", network.token)
    monkeypatch.setenv("CONFER_STUDY", network.study)
    with confer.connect() as client:
        assert client.study == "demo" and client.whoami().name == "researcher"
    monkeypatch.delenv("CONFER_COORDINATOR")
    with pytest.raises(confer.ConfigurationError, match="CONFER_COORDINATOR"):
        confer.connect()
