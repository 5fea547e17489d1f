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
# # A researcher's cohort study: NSAIDs and gastrointestinal bleeding
#
# *For researchers and epidemiologists.* This notebook runs a small cohort
# study across a federation of hospitals without seeing a single patient
# record. The data are the OHDSI **GiBleed** (Eunomia) OMOP CDM data set,
# split by person across three sites (`site-a`, `site-b`, `site-c`); each
# site runs a confer node beside its records, and a coordinator combines what
# the nodes release.
#
# The question: among new users of four NSAIDs (celecoxib, diclofenac,
# ibuprofen, naproxen), how often does gastrointestinal (GI) bleeding follow
# the first prescription, by drug and by sex?
#
# Along the way:
#
# 1. what the network publishes (the catalog: tables, columns, domains, never counts);
# 2. the drug concepts, looked up in the public OMOP vocabulary (free);
# 3. `EXPLAIN PRIVACY`: what each query will cost and how wide its intervals
#    will be, before anything is spent;
# 4. the cohort: users, bleeds and the cumulative incidence (risk) by drug and sex;
# 5. incidence rates per 1,000 person-years;
# 6. the privacy budget afterwards, and a plot with error bars.
#
# Every number that comes from patient records is **differentially private**:
# noisy, with a 95% interval beside it. Nothing here depends on the exact
# noisy values, and neither should your conclusions: compare intervals.

# %% [markdown]
# ## Start a federation on this machine
#
# `confer.local_network()` starts the same federation as `make demo-serve`
# (a coordinator and three GiBleed nodes on loopback ports) and gives a client
# connected as user `researcher` in study `demo`. Against a real network you
# would write `confer.connect("https://coordinator.example:50051",
# token=..., study=...)` instead; everything below stays the same.

# %%
import atexit
import math
import time
from contextlib import ExitStack

import matplotlib.pyplot as plt
import polars as pl

import confer

started = time.monotonic()
session = ExitStack()
atexit.register(session.close)  # stops the federation even if a cell fails
net = session.enter_context(confer.local_network("gibleed", timeout=240))
client = net.client
print(f"coordinator {net.url}, sites {', '.join(net.sites)}, study {net.study!r}")
print(client.whoami())
assert net.sites == ["site-a", "site-b", "site-c"]
assert client.whoami().role == "researcher"

# %% [markdown]
# ## 1. What the network publishes
#
# The catalog lists each table, whether it is person-level (`private`: a
# query over it needs the DP clause) or public (the vocabulary), its privacy
# unit and the sites that hold it. It never says how many rows a site has.

# %%
tables = client.tables()
tables

# %%
assert tables.columns == ["table", "private", "privacy_unit", "one_row_per_unit", "columns", "sites"]
by_name = {row["table"]: row for row in tables.iter_rows(named=True)}
for name in ("person", "drug_exposure", "condition_occurrence", "observation_period"):
    assert by_name[name]["private"] and by_name[name]["privacy_unit"] == "person_id"
    assert sorted(by_name[name]["sites"]) == net.sites
for name in ("concept", "concept_ancestor"):
    assert not by_name[name]["private"]
assert not any("count" in c or "rows" in c for c in tables.columns)  # no row counts

# %% [markdown]
# Columns with a public **domain** can be grouped by at no extra risk: every
# value of the domain is released, empty groups included. Here sex
# (`gender_concept_id`) has one, so we can split by sex. `drug_concept_id`'s
# domain is a short public concept set that lacks ibuprofen and naproxen, so
# we select each drug's users with `WHERE ... IN (...)` instead of grouping
# by it.

# %%
columns = client.catalog().to_polars()
columns.filter(
    pl.col("table").is_in(["person", "drug_exposure", "condition_occurrence"])
    & pl.col("column").is_in(["person_id", "gender_concept_id", "drug_concept_id", "condition_concept_id"])
)

# %%
gender = columns.filter((pl.col("table") == "person") & (pl.col("column") == "gender_concept_id")).row(0, named=True)
assert gender["domain"] is not None and "8507" in str(gender["domain"]) and "8532" in str(gender["domain"])

# %% [markdown]
# ## 2. The drug concepts, from the public vocabulary
#
# OMOP's `concept` and `concept_ancestor` tables are public: a query without
# the DP clause runs as plain SQL at every site, costs nothing, and comes
# back with a `site` column (one copy per site). Each NSAID is an RxNorm
# *ingredient*; prescriptions are recorded as its descendants (clinical
# drugs such as "Ibuprofen 200 MG Oral Tablet").

# %%
budget_before = client.budget()
NSAIDS = ["celecoxib", "diclofenac", "ibuprofen", "naproxen"]
ingredients = client.sql(
    "SELECT concept_id, concept_name FROM concept "
    "WHERE concept_class_id = 'Ingredient' AND vocabulary_id = 'RxNorm' "
    f"AND lower(concept_name) IN ({', '.join(repr(n) for n in NSAIDS)})"
)
assert ingredients.release is None  # a public query: no DP release, nothing spent
ingredients = ingredients.df.select("concept_id", "concept_name").unique().sort("concept_name")
ingredients

# %%
ingredient_ids = ", ".join(str(i) for i in ingredients["concept_id"])
descendants = client.sql(
    "SELECT a.ancestor_concept_id AS ingredient_id, a.descendant_concept_id AS concept_id, "
    "d.concept_name, d.concept_class_id "
    "FROM concept_ancestor a JOIN concept d ON d.concept_id = a.descendant_concept_id "
    f"WHERE a.ancestor_concept_id IN ({ingredient_ids}) AND d.standard_concept = 'S'"
).df
drug_concepts = (
    descendants.drop("site")
    .unique()
    .join(ingredients.rename({"concept_id": "ingredient_id", "concept_name": "ingredient"}), on="ingredient_id")
    .with_columns(pl.col("ingredient").str.to_lowercase())
    .sort("ingredient", "concept_id")
)
drug_concepts

# %%
assert sorted(drug_concepts["ingredient"].unique()) == NSAIDS
assert descendants["site"].unique().sort().to_list() == net.sites
COHORTS = {"any NSAID": drug_concepts["concept_id"].unique().sort().to_list()}
for name in NSAIDS:
    COHORTS[name] = drug_concepts.filter(pl.col("ingredient") == name)["concept_id"].to_list()
    assert COHORTS[name], name
SEX = {8507: "male", 8532: "female"}
GI_BLEEDING = 192671  # SNOMED "Gastrointestinal hemorrhage"
{name: ids for name, ids in COHORTS.items()}

# %% [markdown]
# ## 3. The cohort query, and what it will cost
#
# A new-user design, written in ordinary SQL over the OMOP tables:
#
# * `users`: each person's first prescription of the drug (the index date),
#   one row per person;
# * `bleeds`: each person's first GI bleeding (concept 192671);
# * released, by sex: the number of users, the number with a bleed on or
#   after their index date, and the cumulative incidence (risk) as the mean
#   of a 0/1 indicator, `AVG(..., contribution_bounds_per_group => (0, 1))`,
#   which comes with its own interval.
#
# `OPTIONS (epsilon = 2.0, delta = 1e-6)` is what the query may spend at each
# site. `EXPLAIN PRIVACY` shows the plan without sending anything to the
# nodes: the cost per site, the noise on each released value and the
# expected half-width of its 95% interval.

# %%
EPSILON = 2.0


def cohort_ctes(concept_ids: list[int]) -> str:
    ids = ", ".join(str(i) for i in concept_ids)
    return f"""users AS (
  SELECT person_id, MIN(drug_exposure_start_date) AS index_date
  FROM drug_exposure WHERE drug_concept_id IN ({ids})
  GROUP BY person_id
), bleeds AS (
  SELECT person_id, MIN(condition_start_date) AS first_bleed
  FROM condition_occurrence WHERE condition_concept_id = {GI_BLEEDING}
  GROUP BY person_id
)"""


def by_sex_query(concept_ids: list[int]) -> str:
    return f"""WITH {cohort_ctes(concept_ids)}
SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = {EPSILON}, delta = 1e-6)
  p.gender_concept_id,
  COUNT(*) AS users,
  COUNT(*) FILTER (WHERE b.first_bleed >= u.index_date) AS bleeds,
  AVG(CASE WHEN b.first_bleed >= u.index_date THEN 1.0 ELSE 0.0 END,
      contribution_bounds_per_group => (0, 1)) AS risk
FROM person p
JOIN users u ON u.person_id = p.person_id
LEFT JOIN bleeds b ON b.person_id = p.person_id
GROUP BY p.gender_concept_id
ORDER BY p.gender_concept_id"""


print(by_sex_query(COHORTS["celecoxib"]))

# %%
plan = client.explain(by_sex_query(COHORTS["celecoxib"]))
print(plan.cost_per_site, "|", plan.mechanism)
plan.widths()

# %%
widths = plan.widths()
assert plan.mechanism == "gaussian"
assert plan.cost_per_site is not None and math.isclose(plan.cost_per_site.epsilon, EPSILON)
assert widths["aggregate"].to_list() == ["users", "bleeds", "risk", "risk"]  # AVG: a sum and a count
assert (widths["noise_stddev"] > 0).all() and (widths["interval_half_width"] > widths["noise_stddev"]).all()
assert plan.local_query is not None and "drug_exposure" in plan.local_query

# %% [markdown]
# The whole study will run two queries per cohort (this one, and the
# incidence-rate query of step 5), each at the same cost. Before spending,
# compare that with what is left of the study's budget at each site.
# `EXPLAIN` spent nothing.

# %%
rho_per_query = plan.cost_per_site.rho
planned_rho = 2 * len(COHORTS) * rho_per_query
sites_before = client.budget().filter(pl.col("node").is_in(net.sites))
print(f"planned: {2 * len(COHORTS)} queries, rho {planned_rho:.4f} at each site")
sites_before.select("node", "status", "budget_rho", "spent_rho", "remaining_rho", "remaining_epsilon")

# %%
assert sites_before["spent_rho"].to_list() == budget_before.filter(pl.col("node").is_in(net.sites))["spent_rho"].to_list()
assert (sites_before["remaining_rho"] > planned_rho).all()

# %% [markdown]
# ## 4. Users, bleeds and risk by drug and sex
#
# One query per cohort. Each value comes with `<name>_ci_low` and
# `<name>_ci_high`: a 95% interval for the noise added to protect
# individuals (not for sampling variability: the truth it aims at is the
# exact count over the network's rows).

# %%
results = {}
for name, ids in COHORTS.items():
    results[name] = client.sql(by_sex_query(ids))
results["celecoxib"]

# %%
by_sex = pl.concat(
    [
        r.df.with_columns(pl.lit(name).alias("cohort"), pl.col("gender_concept_id").replace_strict(SEX).alias("sex"))
        for name, r in results.items()
    ]
).select("cohort", "sex", pl.exclude("cohort", "sex", "gender_concept_id"))
by_sex

# %%
assert by_sex.columns == [
    "cohort", "sex",
    "users", "users_ci_low", "users_ci_high",
    "bleeds", "bleeds_ci_low", "bleeds_ci_high",
    "risk", "risk_ci_low", "risk_ci_high",
]
assert by_sex.shape == (2 * len(COHORTS), 11)
for value in ("users", "bleeds", "risk"):
    assert (by_sex[f"{value}_ci_low"] <= by_sex[value]).all() and (by_sex[value] <= by_sex[f"{value}_ci_high"]).all()
assert by_sex["risk_ci_low"].min() >= 0 and by_sex["risk_ci_high"].max() <= 1  # AVG's interval is clamped to its bounds
# The released intervals are as wide as EXPLAIN said (counts: +/- the rounded-up half-width).
predicted = widths.filter(pl.col("aggregate") == "users")["interval_width"][0]
observed = (by_sex["users_ci_high"] - by_sex["users_ci_low"]).to_list()
assert all(abs(w - predicted) <= max(2.0, 0.05 * predicted) for w in observed), (observed, predicted)
for r in results.values():
    assert r.release is not None and r.release.sites == net.sites and r.release.missing_sites == []
    assert math.isclose(r.release.cost_per_site.rho, rho_per_query, rel_tol=1e-3)  # EXPLAIN prints rho to 6 digits

# %% [markdown]
# ## 5. Incidence rates per 1,000 person-years
#
# The risk above ignores how long each person was followed. An incidence
# rate divides the bleeds by the time at risk: from the index date to the
# first bleed, or to the end of observation. Each person's time is clamped
# into [0, 80] years (`contribution_bounds_per_group`), which bounds what one
# person can change and so sets the noise.
#
# The rate itself is a ratio of two released values, computed by the
# coordinator after the noise is added (post-processing, free). confer does
# not derive an interval for such a ratio: its interval columns are NULL and
# the release says why. A conservative interval follows from the two 95%
# intervals (fewest bleeds over most person-years, and the reverse); it
# covers at least 90%.

# %%
def rate_query(concept_ids: list[int]) -> str:
    years = """SUM(CAST(CASE WHEN b.first_bleed >= u.index_date THEN b.first_bleed - u.index_date
                ELSE o.observation_end - u.index_date END AS DOUBLE) / 365.25,
      contribution_bounds_per_group => (0, 80))"""
    bleeds = "COUNT(*) FILTER (WHERE b.first_bleed >= u.index_date)"
    return f"""WITH {cohort_ctes(concept_ids)}, observed AS (
  SELECT person_id, MAX(observation_period_end_date) AS observation_end
  FROM observation_period GROUP BY person_id
)
SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = {EPSILON}, delta = 1e-6)
  {bleeds} AS bleeds,
  {years} AS person_years,
  1000.0 * {bleeds} / {years} AS per_1000_person_years
FROM users u
JOIN observed o ON o.person_id = u.person_id
LEFT JOIN bleeds b ON b.person_id = u.person_id"""


rate_plan = client.explain(rate_query(COHORTS["any NSAID"]))
assert math.isclose(rate_plan.cost_per_site.rho, rho_per_query, rel_tol=1e-3)
rate_plan.widths()

# %%
rate_results = {name: client.sql(rate_query(ids)) for name, ids in COHORTS.items()}
note = rate_results["any NSAID"].release.columns["per_1000_person_years"].interval_note
print("interval note:", note)
rates = pl.concat([r.df.with_columns(pl.lit(name).alias("cohort")) for name, r in rate_results.items()]).select(
    "cohort",
    "bleeds", "bleeds_ci_low", "bleeds_ci_high",
    "person_years", "person_years_ci_low", "person_years_ci_high",
    "per_1000_person_years",
    (1000 * pl.col("bleeds_ci_low") / pl.col("person_years_ci_high")).alias("rate_low_conservative"),
    (1000 * pl.col("bleeds_ci_high") / pl.col("person_years_ci_low")).alias("rate_high_conservative"),
)
rates

# %%
assert rates.height == len(COHORTS)
assert note and "not derived" in note
assert rates["per_1000_person_years"].null_count() == 0
for r in rate_results.values():
    assert r.df["per_1000_person_years_ci_low"].null_count() == 1  # no derived interval for a ratio
assert (rates["person_years_ci_low"] < rates["person_years"]).all()
assert (rates["person_years"] < rates["person_years_ci_high"]).all()
assert (rates["rate_low_conservative"] <= rates["per_1000_person_years"]).all()
assert (rates["per_1000_person_years"] <= rates["rate_high_conservative"]).all()

# %% [markdown]
# ## 6. The budget afterwards
#
# `SHOW PRIVACY BUDGET` (here `client.budget()`): one row per site, then the
# network's worst case. Each query was charged at every site it ran at, in
# zCDP rho (rho adds up; the epsilon columns convert the total at the stated
# delta). The spend is what EXPLAIN predicted, and exactly the sum of the
# releases' costs.

# %%
sites_after = client.budget().filter(pl.col("node").is_in(net.sites))
sites_after.select("node", "budget_rho", "spent_rho", "remaining_rho", "spent_epsilon", "remaining_epsilon", "releases")

# %%
spent = (sites_after["spent_rho"] - sites_before["spent_rho"]).to_list()
charged = sum(r.release.cost_per_site.rho for r in [*results.values(), *rate_results.values()])
assert all(math.isclose(s, charged, rel_tol=1e-9) for s in spent), (spent, charged)
assert math.isclose(charged, planned_rho, rel_tol=1e-3)
assert (sites_after["remaining_rho"] < sites_before["remaining_rho"]).all()
assert (sites_after["releases"] - sites_before["releases"] == 2 * len(COHORTS)).all()

# %% [markdown]
# ## A refused query reads as a Python exception
#
# Person-level tables need the DP clause, and a query may not spend more
# than each node's per-query cap. confer refuses both before any node runs
# anything; the exception carries confer's message, which says what to
# change, and nothing is spent.

# %%
for statement in (
    "SELECT person_id, year_of_birth FROM person",
    "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 50, delta = 1e-6) COUNT(*) AS persons FROM person",
):
    try:
        client.sql(statement)
    except confer.RefusedError as refused:
        print(f"{type(refused).__name__}: {refused.message}\n  (retry may help: {refused.retryable})\n")
    else:
        raise AssertionError("the statement was not refused")
assert client.budget().filter(pl.col("node").is_in(net.sites))["spent_rho"].to_list() == sites_after["spent_rho"].to_list()

# %% [markdown]
# ## The plot
#
# Risk of GI bleeding after the first prescription, by drug and sex, and
# the incidence rate by drug, with their intervals as error bars. Read it as
# the intervals, never as the points: where two intervals overlap, the data
# released here do not tell the two apart.

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
names = list(COHORTS)
for offset, (sex, colour) in zip((-0.15, 0.15), (("female", "tab:red"), ("male", "tab:blue"))):
    part = by_sex.filter(pl.col("sex") == sex).sort(pl.col("cohort").replace_strict({n: i for i, n in enumerate(names)}))
    x = [i + offset for i in range(len(names))]
    left.errorbar(
        x, part["risk"], yerr=[part["risk"] - part["risk_ci_low"], part["risk_ci_high"] - part["risk"]],
        fmt="o", capsize=4, color=colour, label=sex,
    )
left.set_xticks(range(len(names)), names, rotation=20)
left.set_ylabel("risk of GI bleeding after first use")
left.set_title("Cumulative incidence, 95% intervals")
left.legend()
ordered = rates.sort(pl.col("cohort").replace_strict({n: i for i, n in enumerate(names)}))
right.errorbar(
    range(len(names)), ordered["per_1000_person_years"],
    yerr=[
        ordered["per_1000_person_years"] - ordered["rate_low_conservative"],
        ordered["rate_high_conservative"] - ordered["per_1000_person_years"],
    ],
    fmt="s", capsize=4, color="black",
)
right.set_xticks(range(len(names)), names, rotation=20)
right.set_ylabel("bleeds per 1,000 person-years")
right.set_title("Incidence rate, conservative 90% intervals")
fig.tight_layout()
plt.show()
assert len(left.lines) > 0 and len(right.lines) > 0

# %% [markdown]
# ## Stop the federation
#
# `local_network` stops its processes when its `with` block ends; in a
# notebook it was entered on an `ExitStack`, closed here. (In a script,
# write `with confer.local_network() as net: ...`.)

# %%
session.close()
assert client.closed
print(f"notebook ran in {time.monotonic() - started:.0f} s")
