"""Parts of the client that need no federation: job specs, safetensors,
release metadata, EXPLAIN parsing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

import confer
from confer.models import read_safetensors, write_export, write_safetensors


def test_job_specs_from_dicts_files_and_text(tmp_path: Path) -> None:
    text = """name = "x"
rounds = 2
[model]
architecture = "mlp"
hidden = [4]
[data]
features = ["a", "b", "c"]
"""
    path = tmp_path / "job.toml"
    path.write_text(text)
    from_text = confer.load_job_spec(text)
    assert from_text["model"]["inputs"] == 3
    assert confer.load_job_spec(path) == from_text == confer.load_job_spec(str(path))
    given = {"model": {"architecture": "cox", "inputs": 7}, "data": {"features": ["a"]}}
    spec = confer.load_job_spec(given)
    assert spec["model"]["inputs"] == 7 and spec is not given
    with pytest.raises(confer.ConfigurationError, match="not JSON-serialisable"):
        confer.load_job_spec({"x": object()})


def test_safetensors_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    tensors = {
        "layers.0.weight": ([2, 3], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        "layers.0.bias": ([2], [0.5, -0.5]),
    }
    write_safetensors(path, tensors)
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    assert size % 8 == 0
    assert read_safetensors(path) == {k: (list(s), list(v)) for k, (s, v) in tensors.items()}
    (tmp_path / "bad.safetensors").write_bytes(b"123")
    with pytest.raises(confer.ConfigurationError, match="not a safetensors file"):
        read_safetensors(tmp_path / "bad.safetensors")


def test_an_mlp_export_reproduces_the_documented_layout(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import base64
    import struct

    # models/src/model.rs: mlp(3, [2]) with parameters 0..10 gives 148 at x = [1, 0, 0].
    values = [float(i) for i in range(11)]
    export = {
        "job_id": "j",
        "round": 1,
        "spec": {"architecture": "mlp", "inputs": 3, "hidden": [2]},
        "weights": base64.b64encode(struct.pack("<11f", *values)).decode(),
        "features": ["a", "b", "c"],
        "standardisation": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        "privacy": {"summary": "s"},
    }
    weights = write_export(
        export, tmp_path / "m.safetensors", bounds={"a": [-5, 5], "b": [0, 1], "c": [0, 1]}
    )
    meta = json.loads((tmp_path / "m.job.json").read_text())
    assert meta["bounds"]["a"] == [-5, 5] and meta["privacy"]["summary"] == "s"
    model = confer.load_torch_model(weights)
    x = torch.tensor([[1.0, 0.0, 0.0]])
    assert model(x).item() == 148.0
    assert model.predict([[9.0, 0.0, 0.0]]).item() == pytest.approx(torch.sigmoid(torch.tensor(148.0)).item())
    cox = dict(
        export,
        spec={"architecture": "cox", "inputs": 3},
        weights=base64.b64encode(struct.pack("<3f", 1, 2, 3)).decode(),
    )
    cox_model = confer.load_torch_model(write_export(cox, tmp_path / "cox.safetensors"))
    assert [n for n, _ in cox_model.named_parameters()] == ["layers.0.weight"]
    assert cox_model.predict([[1.0, 1.0, 1.0]]).item() == pytest.approx(6.0)
    with pytest.raises(confer.ConfigurationError, match="does not exist"):
        confer.load_torch_model(tmp_path / "missing.safetensors")


def _schema(result: dict[str, Any], field_meta: dict[str, str]) -> pa.Schema:
    return pa.schema(
        [
            pa.field("n", pa.int64(), metadata=field_meta),
            pa.field("n_ci_low", pa.float64()),
            pa.field("n_ci_high", pa.float64()),
        ],
        metadata={"confer.result": json.dumps(result), "confer.missing_sites": "site-c"},
    )


def test_release_metadata_is_typed() -> None:
    schema = _schema(
        {
            "query_id": "q",
            "sites": ["site-a", "site-b"],
            "cost_per_site": {"rho": 0.1, "epsilon": 1.0, "delta": 1e-6},
            "confidence": 0.9,
        },
        {"confer.mechanism": "gaussian", "confer.confidence": "0.9", "confer.interval": "n_ci_low,n_ci_high"},
    )
    release = confer.Release.from_schema(schema)
    assert release is not None
    assert release.missing_sites == ["site-c"] and release.sites_answered == 2
    assert release.columns["n"].noise_stddev is None and release.columns["n"].interval == (
        "n_ci_low",
        "n_ci_high",
    )
    assert "Missing (did not answer): site-c." in release.summary()
    assert "90% confidence" in release.summary()
    broken = schema.with_metadata({"confer.result": "{"})
    with pytest.raises(confer.InternalError, match="unreadable"):
        confer.Release.from_schema(broken)


def test_explain_rows_of_every_shape_parse() -> None:
    rows = {
        "item": ["mechanism", "cost per node", "aggregate a", "aggregate b", "aggregate c"],
        "value": [
            "gaussian",
            "epsilon = 1.000000, delta = 1e-6, rho (zCDP) = 0.024356",
            "COUNT(*) [p0]: per-group bound 1, sensitivity L1 1 / L2 1.0000, noise scale 4.5309 per node "
            "(standard deviation 4.5309); standard deviation per group from its one site; 95% interval +/- 8.8804",
            "COUNT(*) [p0]: per-group bound 1, sensitivity L1 1 / L2 1.0000; distributed discrete Gaussian over a "
            "secure sum: standard deviation 4.5309 with 2 contributing node(s), up to 5.5492 if all 3 contribute; "
            "95% interval +/- 8.8804 at 2",
            "COUNT(DISTINCT person_id) [p0]: per-group bound 1, sensitivity L1 5 / L2 2.2361, noise scale 14.7643 "
            "per node (standard deviation 14.7643); standard deviation per group summed over the sites that "
            "released it, at most 25.5725 over 3; 95% interval +/- 50.1212 at most",
        ],
    }
    table = pa.table(rows).replace_schema_metadata({"confer.explain": "true"})
    explained = confer.Explanation(table)
    assert explained.cost_per_site == confer.Cost(rho=0.024356, epsilon=1.0, delta=1e-6)
    a, b, c = explained.aggregates
    assert (a.noise_stddev, a.interval_half_width, a.partial) == (4.5309, 8.8804, "p0")
    assert (b.noise_stddev, b.interval_half_width) == (4.5309, 8.8804)
    assert (c.noise_stddev, c.interval_half_width) == (25.5725, 50.1212)
    assert explained.local_query is None
    with pytest.raises(confer.InternalError):
        confer.Explanation(pa.table({"x": [1]}))
