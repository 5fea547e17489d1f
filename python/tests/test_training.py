"""Federated training through the client, on the four UCI heart-disease
hospitals (``local_network("heart")``): submit from TOML or a dict, follow
with progress, metrics, cancel, export, and the model in PyTorch. Tiny
jobs: a few rounds of a few steps."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import confer
from confer.models import read_safetensors

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_JOB = REPO / "examples" / "datasets" / "uci-heart" / "job.toml"


def tiny_job_text(rounds: int = 3, standardisation_share: float | None = None) -> str:
    """The example FedAvg job, three rounds of 50 steps at a larger learning
    rate, evaluated after the last round, at epsilon 5 (the nodes' cap)."""
    text = (
        EXAMPLE_JOB.read_text()
        .replace("rounds = 15", f"rounds = {rounds}")
        .replace("budget = { steps = 100 }", "budget = { steps = 50 }")
        .replace("learning_rate = 0.001", "learning_rate = 0.01")
        .replace("every = 5", "every = 0")
        .replace("epsilon = 2.0", "epsilon = 5.0")
    )
    if standardisation_share is not None:
        text = text.replace(
            "epsilon = 5.0", f"epsilon = 5.0\nstandardisation_share = {standardisation_share}"
        )
    return text


@pytest.fixture(scope="module")
def finished(heart: confer.LocalNetwork, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny job, submitted from a TOML file and followed to the end."""
    path = tmp_path_factory.mktemp("job") / "job.toml"
    # Most of the budget to the DP standardisation (the rest evaluates):
    # its noise is what moves the model between runs.
    path.write_text(tiny_job_text(standardisation_share=0.9))
    job = heart.client.train(path)
    out = io.StringIO()
    status = job.wait(progress=True, timeout=300, stream=out)
    return {"job": job, "status": status, "progress": out.getvalue()}


def test_a_job_runs_to_the_end_with_progress(finished: dict[str, Any]) -> None:
    job: confer.Job = finished["job"]
    status: confer.JobStatus = finished["status"]
    assert status.state == "finished" and status.is_final
    assert status.round == status.rounds == 3
    assert status.sites == ["cleveland", "hungary", "switzerland", "va-long-beach"]
    assert status.privacy_summary and "NOT differentially private" in status.privacy_summary
    assert job.privacy is not None and job.privacy["dp_training"] is False
    text = finished["progress"]
    # Not a terminal: plain lines, one per round, and the end.
    assert "\r" not in text
    assert "privacy: " in text
    for n in (1, 2, 3):
        assert f"round   {n}: 4 nodes" in text
    assert "finished after 3 rounds" in text


def test_metrics_as_a_dataframe(finished: dict[str, Any]) -> None:
    metrics = finished["job"].metrics()
    assert metrics.columns == [
        "round",
        "site",
        "examples",
        "loss",
        "accuracy",
        "auc",
        "noise_stddev",
        "contributors",
        "dropped",
        "clipped",
        "update_norm",
        "local_secs",
        "secagg_secs",
        "server_secs",
    ]
    assert sorted(set(metrics["round"].to_list())) == [1, 2, 3]
    assert metrics.filter(pl.col("round") < 3)["site"].null_count() == 2
    last = metrics.filter(pl.col("round") == 3)
    assert set(last["site"].to_list()) == {"cleveland", "hungary", "switzerland", "va-long-beach", "overall"}
    assert (metrics["contributors"] == 4).all()
    # DP evaluation: noisy, so only its shape and ranges.
    overall = last.filter(pl.col("site") == "overall").row(0, named=True)
    assert overall["noise_stddev"] > 0 and overall["examples"] > 0
    assert 0.0 <= overall["accuracy"] <= 1.0


def test_the_job_is_listed_and_can_be_attached(heart: confer.LocalNetwork, finished: dict[str, Any]) -> None:
    job: confer.Job = finished["job"]
    jobs = heart.client.jobs()
    assert job.id in jobs["job_id"].to_list()
    again = heart.client.job(job.id)
    assert again.status().state == "finished" and again.spec is None
    assert again.metrics().height == job.metrics().height


def test_the_web_console_draws_the_rounds(heart: confer.LocalNetwork, finished: dict[str, Any]) -> None:
    """The researcher's page in the coordinator's web console draws the
    job's rounds: its curves hold the round metrics the API reports
    (Debian's chromium through Playwright, as tests/python/test_console.py)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    assert heart.console_url, heart.output()
    job: confer.Job = finished["job"]
    status = job.status()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page()
        page.goto(heart.console_url + "login#token=" + heart.token)
        assert page.input_value("#token") == heart.token and "#" not in page.url
        page.click("#login-button")
        page.wait_for_url(heart.console_url + "researcher")
        page.wait_for_selector("body[data-ready='true']")
        norms = page.evaluate(
            "() => window.confer.charts['train-chart'].getOption().series.find((s) => s.id === 'update_norm').data"
        )
        assert norms == pytest.approx([r["update_norm"] for r in status.history], rel=1e-12)
        rounds = page.evaluate("() => window.confer.charts['train-chart'].getOption().xAxis[0].data")
        assert rounds == list(range(1, status.rounds + 1))
        assert job.id[:8] in page.inner_text("#jobs") or status.name in page.inner_text("#jobs")
        browser.close()


def heart_rows(model: Any) -> tuple[Any, list[float]]:
    """Every usable row of the four centres, computed as the job's feature
    query does (FLamby's preprocessing), and the labels."""
    names = [
        "age",
        "sex",
        "cp",
        "trestbps",
        "chol",
        "fbs",
        "restecg",
        "thalach",
        "exang",
        "oldpeak",
        "slope",
        "ca",
        "thal",
        "num",
    ]
    data = REPO.parent / "shared" / "data" / "uci_heart_disease"
    frames = [
        pl.read_csv(
            data / f,
            has_header=False,
            new_columns=names,
            null_values="?",
            schema_overrides={n: pl.Float64 for n in names},
        )
        for f in (
            "processed.cleveland.data",
            "processed.hungarian.data",
            "processed.switzerland.data",
            "processed.va.data",
        )
    ]
    used = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak", "num"]
    rows = pl.concat(frames).drop_nulls(used)
    rows = rows.with_columns(
        *(pl.col("cp").eq(v).cast(pl.Float64).alias(f"cp_{v}") for v in (2, 3, 4)),
        *(pl.col("restecg").eq(v).cast(pl.Float64).alias(f"restecg_{v}") for v in (1, 2)),
        pl.col("num").gt(0).cast(pl.Float64).alias("label"),
    )
    return rows.select(model.features).to_numpy(), rows["label"].to_list()


def test_export_and_load_into_pytorch(
    heart: confer.LocalNetwork, finished: dict[str, Any], tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    job: confer.Job = finished["job"]
    weights = job.export(tmp_path / "out" / "model.safetensors")
    assert weights == tmp_path / "out" / "model.safetensors"
    assert (tmp_path / "out" / "model.spec.json").is_file()
    assert (tmp_path / "out" / "model.job.json").is_file()

    model = confer.load_torch_model(weights)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model.spec["architecture"] == "logistic_regression" and model.spec["inputs"] == 13
    assert model.features[:3] == ["age", "sex", "trestbps"]
    assert model.job_id == job.id and model.round == 3
    assert model.lo is not None  # bounds from the submitted spec
    x, labels = heart_rows(model)
    probabilities = model.predict(x)
    assert probabilities.shape == (len(labels),)
    assert bool(((probabilities >= 0) & (probabilities <= 1)).all())
    # A model trained by the federation classifies the hospitals' patients
    # well above chance: the forward pass and the standardisation match.
    correct = sum(int((p > 0.5) == (y > 0.5)) for p, y in zip(probabilities.tolist(), labels, strict=True))
    assert correct / len(labels) > 0.7
    logits = model(model.standardise(x))
    assert torch.allclose(torch.sigmoid(logits), probabilities)

    # The CLI's export (written by tch) holds the same tensors, and loads too.
    cli = tmp_path / "cli.safetensors"
    subprocess.run(
        [
            str(confer.find_binary()),
            "model",
            "export",
            "--coordinator",
            heart.url,
            "--token",
            heart.token,
            "--job",
            job.id,
            "--out",
            str(cli),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert read_safetensors(cli) == read_safetensors(weights)
    from_cli = confer.load_torch_model(
        cli,
        bounds=dict(zip(model.features, zip(model.lo.tolist(), model.hi.tolist(), strict=True), strict=True)),
    )
    assert torch.allclose(from_cli.predict(x), probabilities)


def test_a_dict_job_with_dp_training_can_be_cancelled(heart: confer.LocalNetwork) -> None:
    import tomllib

    spec = tomllib.loads(tiny_job_text(rounds=50))
    spec["privacy"].update(dp_training=True, clip_norm=1.0)
    spec["name"] = "to-cancel"
    job = heart.client.train(spec)
    assert job.spec is not None and job.spec["model"]["inputs"] == 13
    assert job.privacy is not None and job.privacy["dp_training"] is True
    cancelled = job.cancel()
    assert cancelled.job_id == job.id
    status = job.wait(progress=False, timeout=120)
    assert status.state == "cancelled" and status.round < 50


def test_follow_times_out_without_stopping_the_job(heart: confer.LocalNetwork) -> None:
    job = heart.client.train(tiny_job_text(rounds=40))
    try:
        with pytest.raises(confer.DeadlineExceededError, match="goes on at the coordinator"):
            job.wait(progress=False, timeout=0.5)
        assert job.status().state in ("preparing", "running")
    finally:
        job.cancel()
    assert job.wait(progress=False, timeout=120).state == "cancelled"


def test_a_progress_bar_on_a_terminal(heart: confer.LocalNetwork) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    job = heart.client.train(tiny_job_text(rounds=2))
    out = Terminal()
    job.wait(progress=True, timeout=300, stream=out)
    text = out.getvalue()
    assert "\r\x1b[2Kround 2/2 [" in text and "round   2: 4 nodes" in text


def test_a_job_whose_feature_query_does_not_plan_is_refused_at_submit(heart: confer.LocalNetwork) -> None:
    with pytest.raises(confer.RefusedError, match="hearts"):
        heart.client.train(tiny_job_text().replace("FROM heart", "FROM hearts"))


def test_a_spec_with_a_bad_field_names_it(heart: confer.LocalNetwork) -> None:
    with pytest.raises(confer.RefusedError, match="rounds"):
        heart.client.train(tiny_job_text().replace("rounds = 3", "rounds = 0"))


def test_bad_job_input_on_the_client(heart: confer.LocalNetwork, tmp_path: Path) -> None:
    with pytest.raises(confer.ConfigurationError, match="not valid TOML"):
        heart.client.train("name = \nrounds = ")
    with pytest.raises(confer.ConfigurationError, match="cannot read the job file"):
        heart.client.train(str(tmp_path / "missing.toml"))
    with pytest.raises(confer.ConfigurationError, match="a job is a dict"):
        heart.client.train(42)  # type: ignore[arg-type]
    with confer.connect(heart.url, token=heart.token) as no_study:
        with pytest.raises(confer.ConfigurationError, match="runs under a study"):
            no_study.train(tiny_job_text())


def test_the_gibleed_demo_refuses_training_at_prepare(client: confer.Client) -> None:
    """The GiBleed demo's nodes allow no model architecture: the job is
    accepted by the coordinator, then fails at prepare, nothing charged."""
    before = client.budget()["spent_rho"].to_list()
    job = client.train(
        {
            "name": "gibleed-sex",
            "rounds": 1,
            "seed": 1,
            "model": {"architecture": "logistic_regression"},
            "data": {
                "query": "SELECT person_id, CAST(year_of_birth AS DOUBLE) AS yob, "
                "CAST(gender_concept_id = 8507 AS DOUBLE) AS label FROM person",
                "features": ["yob"],
                "label": "label",
                "unit": "person_id",
                "bounds": {"yob": [1900, 2020]},
            },
            "local": {
                "budget": {"steps": 5},
                "batch_size": 4,
                "learning_rate": 0.01,
                "optimizer": {"kind": "sgd"},
            },
            "server": {"strategy": "fed_avg"},
            "privacy": {"epsilon": 1.0, "delta": 1e-5, "dp_training": True, "clip_norm": 1.0},
            "evaluation": {"every": 0},
        }
    )
    with pytest.raises(confer.JobFailedError, match="may not train logistic_regression") as err:
        job.wait(progress=False, timeout=60)
    assert err.value.status.state == "failed"
    assert "nothing was charged" in str(err.value)
    assert job.wait(progress=False, raise_on_failure=False).state == "failed"
    with pytest.raises(confer.RefusedError, match="has no model yet"):
        job.export("never.safetensors")
    with pytest.raises(confer.ConfigurationError, match=".safetensors extension"):
        job.export("model.pt")
    assert client.budget()["spent_rho"].to_list() == before
    with pytest.raises(confer.NotFoundError):
        client.job("00000000-0000-0000-0000-000000000000")
