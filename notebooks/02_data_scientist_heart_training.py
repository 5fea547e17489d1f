# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A data scientist's model: heart disease across four hospitals
#
# *For data scientists and ML engineers.* Four hospitals (Cleveland,
# Hungary, Switzerland, VA Long Beach: the UCI heart-disease data, as in
# FLamby's Fed-Heart-Disease benchmark) each run a confer node. We train one
# logistic regression across them without moving a record: each node trains
# on its own rows and sends only a clipped update into a secure-aggregation
# session; the coordinator learns the sum and nothing else.
#
# We compare four ways to train it:
#
# | job | server optimiser | privacy of the model |
# |---|---|---|
# | FedAvg | weighted average of the updates | not DP: updates clipped and securely aggregated, no noise |
# | FedAdam | Adam on the averaged update | not DP, as FedAvg |
# | DP-SGD, ε = 5 | Adam on the noisy mean gradient | each person's gradient clipped, distributed Gaussian noise: (5, 1e-5)-DP per node |
# | DP-SGD, ε = 1 | as above | (1, 1e-5)-DP per node |
#
# then read their learning curves and per-site evaluations (released by
# the nodes with DP), export the models and use them in PyTorch.
#
# The jobs are kept small (10 to 30 rounds) so that the notebook runs in
# well under two minutes on a laptop.

# %% [markdown]
# ## Start the four hospitals on this machine
#
# `confer.local_network("heart")` starts a node per hospital and a
# coordinator on loopback, with a policy that allows logistic regression and
# MLPs in study `demo` (a budget of ε = 20 per node). The client is connected
# as user `researcher`.

# %%
import atexit
import copy
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import matplotlib.pyplot as plt
import polars as pl
import torch

import confer

started = time.monotonic()
REPO = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "examples" / "datasets" / "uci-heart").is_dir())
session = ExitStack()
atexit.register(session.close)  # stops the federation even if a cell fails
net = session.enter_context(confer.local_network("heart", timeout=180))
client = net.client
SITES = ["cleveland", "hungary", "switzerland", "va-long-beach"]
print(f"coordinator {net.url}, sites {', '.join(net.sites)}")
assert net.sites == SITES

# %% [markdown]
# What the hospitals publish: one person-level table, `heart`, with its
# columns' types and bounds (never its rows or counts), at four sites.

# %%
heart = client.catalog().table("heart")
print(f"table heart: privacy unit {heart.privacy_unit!r}, sites {heart.sites}")
client.catalog().to_polars().filter(pl.col("table") == "heart")

# %%
assert heart.private and heart.privacy_unit == "patient" and sorted(heart.sites) == SITES
assert {"age", "sex", "cp", "trestbps", "chol", "thalach", "num"} <= {c.name for c in heart.columns}

# %% [markdown]
# ## The job specifications
#
# A job is the TOML format of `examples/datasets/uci-heart/job.toml` (or the
# same structure as a dict). Its feature query runs at each node and
# computes one row per patient; the spec also names the features, their
# bounds (values are clamped to them), the local training and the privacy
# parameters. We start from that file and change a few fields per job.

# %%
base = confer.load_job_spec(REPO / "examples" / "datasets" / "uci-heart" / "job.toml")
print(base["data"]["query"])
print("features:", base["data"]["features"])


def variant(name: str, rounds: int, every: int, **sections: dict) -> dict:
    spec = copy.deepcopy(base)
    spec.update(name=name, rounds=rounds)
    spec["evaluation"]["every"] = every
    for section, changes in sections.items():
        spec[section].update(changes)
    return spec


# Without DP training the budget pays only for the DP standardisation and
# the DP evaluations: give most of it to the evaluations (the learning curves).
NON_DP = {"epsilon": 5.0, "standardisation_share": 0.3, "evaluation_share": 0.7}
ADAM = {"strategy": "fed_adam", "server_learning_rate": 0.01, "beta2": 0.999, "tau": 1e-8}


def dp_sgd(epsilon: float) -> dict:
    return {"epsilon": epsilon, "dp_training": True, "clipping": "example", "clip_norm": 1.0}


JOBS = {
    "FedAvg": variant("heart-fedavg", 10, 2, local={"budget": {"steps": 50}, "learning_rate": 0.01}, privacy=NON_DP),
    "FedAdam": variant(
        "heart-fedadam", 10, 2, local={"budget": {"steps": 50}, "learning_rate": 0.01}, server=ADAM, privacy=NON_DP
    ),
    # DP-SGD across the federation: each round is one step on the noisy
    # mean of every patient's clipped gradient.
    "DP-SGD ε=5": variant(
        "heart-dpsgd-eps5", 30, 5, local={"learning_rate": 1.0},
        server={**ADAM, "server_learning_rate": 0.05}, privacy=dp_sgd(5.0),
    ),
    "DP-SGD ε=1": variant(
        "heart-dpsgd-eps1", 30, 5, local={"learning_rate": 1.0},
        server={**ADAM, "server_learning_rate": 0.05}, privacy=dp_sgd(1.0),
    ),
}
pl.DataFrame(
    {
        "job": list(JOBS),
        "rounds": [s["rounds"] for s in JOBS.values()],
        "strategy": [s["server"]["strategy"] for s in JOBS.values()],
        "dp_training": [s["privacy"]["dp_training"] for s in JOBS.values()],
        "clipping": [s["privacy"].get("clipping", "update") for s in JOBS.values()],
        "epsilon": [s["privacy"]["epsilon"] for s in JOBS.values()],
    }
)

# %% [markdown]
# ## Train
#
# `client.train(spec)` submits a job; the coordinator checks the spec and
# plans the feature query before any node is contacted. Each node then
# admits it under its own policy, and charges the job's whole privacy cost
# to its ledger before round one. `job.wait()` follows it (a progress bar on
# a terminal, a line per round here). The privacy statement says what the
# trained model does and does not protect.

# %%
budget = [client.budget().filter(pl.col("node").is_in(SITES))]
done = {}
for label, spec in JOBS.items():
    job = client.train(spec)
    print(f"\n== {label}: {job.privacy['summary']}")
    job.wait(progress=True, timeout=600)
    done[label] = job
    budget.append(client.budget().filter(pl.col("node").is_in(SITES)))

# %%
for label, job in done.items():
    status = job.status()
    assert status.state == "finished" and status.round == JOBS[label]["rounds"], (label, status)
    assert status.sites == SITES
assert "NOT differentially private" in done["FedAvg"].privacy["summary"]
assert done["DP-SGD ε=5"].privacy["dp_training"] is True
assert "gradient was clipped" in done["DP-SGD ε=5"].privacy["summary"]
# Each job was charged at every node; ε = 1 costs less than ε = 5.
spends = [(after["spent_rho"] - before["spent_rho"]).to_list() for before, after in zip(budget, budget[1:])]
for (label, _), spend in zip(JOBS.items(), spends):
    assert all(s > 0 for s in spend) and max(spend) - min(spend) < 1e-9, (label, spend)
assert spends[3][0] < spends[2][0]
pl.DataFrame({"job": list(JOBS), "spent_rho_per_node": [s[0] for s in spends]})

# %% [markdown]
# ## Learning curves
#
# `job.metrics()` is the job's history as a DataFrame: one row per round
# (the update norm, timings, clipping), and for the rounds that were
# evaluated one row per site plus `overall`, with loss, accuracy and AUC on
# each node's held-out patients. Those evaluation figures are released with
# DP noise (the `noise_stddev` column): a jagged curve is partly noise.
# The update norm is the size of the aggregated step each round (with DP-SGD
# it includes the noise).

# %%
metrics = pl.concat([job.metrics().with_columns(pl.lit(label).alias("job")) for label, job in done.items()])
metrics.filter(pl.col("site") == "overall").select("job", "round", "examples", "loss", "accuracy", "auc", "noise_stddev")

# %%
assert metrics.columns[:14] == [
    "round", "site", "examples", "loss", "accuracy", "auc", "noise_stddev",
    "contributors", "dropped", "clipped", "update_norm", "local_secs", "secagg_secs", "server_secs",
]
for label, spec in JOBS.items():
    own = metrics.filter(pl.col("job") == label)
    assert sorted(own["round"].unique()) == list(range(1, spec["rounds"] + 1))
    evaluated = sorted(own.filter(pl.col("site") == "overall")["round"])
    every = spec["evaluation"]["every"]
    assert evaluated == list(range(every, spec["rounds"] + 1, every))
    assert (own["contributors"] == len(SITES)).all()
overall = metrics.filter(pl.col("site") == "overall")
assert (overall["noise_stddev"] > 0).all()
assert overall["accuracy"].drop_nulls().is_between(0, 1).all() and overall["auc"].drop_nulls().is_between(0, 1).all()

# %%
fig, (acc_ax, auc_ax, norm_ax) = plt.subplots(1, 3, figsize=(14, 3.8))
for label in JOBS:
    part = overall.filter(pl.col("job") == label).sort("round")
    acc_ax.plot(part["round"], part["accuracy"], marker="o", label=label)
    auc_ax.plot(part["round"], part["auc"], marker="o", label=label)
    rounds = metrics.filter((pl.col("job") == label) & (pl.col("site").is_null() | (pl.col("site") == "overall")))
    rounds = rounds.unique("round").sort("round")
    norm_ax.plot(rounds["round"], rounds["update_norm"], label=label)
acc_ax.set(title="held-out accuracy (DP evaluation)", xlabel="round", ylim=(0, 1))
auc_ax.set(title="held-out AUC (DP evaluation)", xlabel="round", ylim=(0, 1))
norm_ax.set(title="norm of the aggregated update", xlabel="round", yscale="log")
acc_ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Per-site evaluation
#
# After the last round each node evaluated the final model on its own
# held-out patients and released the counts with DP. Switzerland's held-out
# set is small (about a dozen patients), so its figures are the noisiest;
# a node whose noisy example count comes out at zero reports no accuracy.
# The DP-SGD jobs give only 10% of their budget to evaluation (the
# default), spread over six evaluations: at ε = 1 these figures are mostly
# noise. To judge a DP model, spend budget on one final evaluation
# (`evaluation.every = 0`) or evaluate on data you may see.

# %%
last = metrics.join(
    pl.DataFrame({"job": list(JOBS), "last": [s["rounds"] for s in JOBS.values()]}), on="job"
).filter((pl.col("round") == pl.col("last")) & pl.col("site").is_not_null())
per_site = last.pivot(on="job", index="site", values="accuracy").sort(pl.col("site") == "overall", "site")
per_site

# %%
assert sorted(last["site"].unique()) == sorted([*SITES, "overall"])
assert per_site.columns == ["site", *JOBS]
assert per_site.height == len(SITES) + 1
for label in JOBS:
    assert per_site[label].drop_nulls().is_between(0, 1).all()

# %% [markdown]
# ## The models in PyTorch
#
# `job.export(path)` writes the final weights as safetensors, with the model
# spec and the job's metadata (features, the network-wide standardisation,
# the privacy statement) beside them. `confer.load_torch_model` turns them
# into a `torch.nn.Module`: `model(x)` maps standardised features to logits,
# exactly as confer's model does; `model.predict(raw)` clamps raw features
# to the job's bounds and standardises them first.

# %%
export_dir = Path(session.enter_context(tempfile.TemporaryDirectory(prefix="heart-models-")))
models = {}
for label, job in done.items():
    weights = job.export(export_dir / f"{job.spec['name']}.safetensors")
    models[label] = confer.load_torch_model(weights)
model = models["FedAvg"]
print(model)
print("features:", model.features)
print("privacy:", model.privacy["summary"])

# %%
for label, m in models.items():
    assert isinstance(m, torch.nn.Module) and not m.training
    assert m.spec["architecture"] == "logistic_regression" and m.spec["inputs"] == 13
    assert m.features == base["data"]["features"]
    assert m.job_id == done[label].id and m.round == JOBS[label]["rounds"]

# %% [markdown]
# A logistic regression on standardised features reads directly: each
# weight is the change in log-odds of heart disease per standard deviation
# of the feature.

# %%
coefficients = pl.DataFrame(
    {label: m.layers[0].weight.detach()[0].tolist() for label, m in models.items()}
).insert_column(0, pl.Series("feature", model.features))
coefficients.sort("FedAvg", descending=True)

# %%
assert all(len(m.layers) == 1 and m.layers[0].weight.shape == (1, 13) for m in models.values())
assert coefficients.shape == (13, 1 + len(JOBS))

# %% [markdown]
# The UCI heart-disease files are public, so here (and only because they
# are) we can check the models on the patients themselves, with FLamby's
# preprocessing (the job's feature query, in polars). These rows include
# the ones each node trained on, so the figures are optimistic; the DP
# evaluation above used held-out patients only.

# %%
NAMES = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num"]
FILES = {
    "cleveland": "processed.cleveland.data",
    "hungary": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va-long-beach": "processed.va.data",
}
data_dir = REPO.parent / "shared" / "data" / "uci_heart_disease"
USED = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak", "num"]
patients = pl.concat(
    [
        pl.read_csv(
            data_dir / file, has_header=False, new_columns=NAMES, null_values="?",
            schema_overrides={n: pl.Float64 for n in NAMES},
        ).with_columns(pl.lit(site).alias("site"))
        for site, file in FILES.items()
    ]
).drop_nulls(USED).with_columns(
    *(pl.col("cp").eq(v).cast(pl.Float64).alias(f"cp_{v}") for v in (2, 3, 4)),
    *(pl.col("restecg").eq(v).cast(pl.Float64).alias(f"restecg_{v}") for v in (1, 2)),
    pl.col("num").gt(0).cast(pl.Float64).alias("label"),
)
x = torch.tensor(patients.select(model.features).to_numpy(), dtype=torch.float32)

with torch.no_grad():
    scored = patients.select("site", "label").with_columns(
        *(pl.Series(label, m.predict(x).numpy()) for label, m in models.items())
    )
accuracy = scored.group_by("site").agg(
    pl.len().alias("patients"),
    *(((pl.col(label) > 0.5).cast(pl.Float64) == pl.col("label")).mean().alias(label) for label in models),
).sort("site")
accuracy

# %%
assert accuracy.height == len(SITES) and accuracy["patients"].sum() == patients.height
with torch.no_grad():
    for label, m in models.items():
        p = m.predict(x)
        assert p.shape == (patients.height,) and bool(((p >= 0) & (p <= 1)).all())
        # The same forward pass by hand: standardise, then the logits.
        assert torch.allclose(torch.sigmoid(m(m.standardise(x))), p)
# The non-private models classify well above chance (about 0.55 by always
# answering "disease"); the DP-SGD models are left unasserted: their noise is the point.
overall_accuracy = {label: float(((scored[label] > 0.5).cast(pl.Float64) == scored["label"]).mean()) for label in models}
assert overall_accuracy["FedAvg"] > 0.7 and overall_accuracy["FedAdam"] > 0.7, overall_accuracy
overall_accuracy

# %% [markdown]
# ## A job the nodes refuse
#
# Each node caps what one task may spend (here ε = 5). A job over the cap is
# accepted by the coordinator, refused by the nodes when it is prepared,
# and fails with every node's reason; nothing is charged anywhere.

# %%
too_costly = variant("heart-too-costly", 2, 0, privacy={"epsilon": 8.0})
spent_before = client.budget().filter(pl.col("node").is_in(SITES))["spent_rho"].to_list()
try:
    client.train(too_costly).wait(progress=False, timeout=120)
except (confer.JobFailedError, confer.RefusedError) as refused:
    print(f"{type(refused).__name__}: {refused}")
else:
    raise AssertionError("the job was not refused")
assert client.budget().filter(pl.col("node").is_in(SITES))["spent_rho"].to_list() == spent_before

# %% [markdown]
# ## Stop the federation

# %%
session.close()
assert client.closed
print(f"notebook ran in {time.monotonic() - started:.0f} s")
