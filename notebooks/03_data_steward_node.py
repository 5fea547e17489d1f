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
# # A data steward's view of a node
#
# *For data stewards, data protection officers and IT staff at a hospital.*
# A confer node runs beside the hospital's records. The steward decides
# which studies it serves and with what budget, and can check afterwards
# what it released, to whom, at what privacy cost, and that the record of
# it was not altered.
#
# Today the steward works on the node's machine with the `confer` command
# and the node's `node.toml`; there is no steward API in the Python client
# and no web console. This notebook calls those commands with `subprocess`,
# exactly as a steward would type them, against `site-a` of a local GiBleed
# federation, and shows what the researcher sees as a consequence:
#
# 1. the node's policy (`node.toml`);
# 2. studies, approvals and spending (`confer node studies`);
# 3. the audit log (`confer audit export`) and its verification
#    (`confer audit verify`), including what it reports when a record was edited;
# 4. denying and re-approving a study, with a budget of the steward's own;
# 5. changing the policy while the node runs;
# 6. charged failures and lifting a block (`confer node failures`, `confer node lift`);
# 7. the node's secure-aggregation identity (`confer node identity`).

# %%
import atexit
import json
import shutil
import sqlite3
import subprocess
import tempfile
import time
import tomllib
from contextlib import ExitStack
from pathlib import Path

import polars as pl

import confer

started = time.monotonic()
session = ExitStack()
atexit.register(session.close)  # stops the federation even if a cell fails
net = session.enter_context(confer.local_network("gibleed", timeout=240))
researcher = net.client  # what the researcher sees, to compare with the steward's view
CONFER = confer.find_binary()
NODE_TOML = net.work_dir / "demo" / "site-a.toml"  # confer demo writes one node.toml per site
print(f"node config: {NODE_TOML}")
assert NODE_TOML.is_file()


def steward(*args: str, config: Path = NODE_TOML, check: bool = True) -> subprocess.CompletedProcess:
    """Runs `confer <args> --config <node.toml>` as the steward would, and prints what it says."""
    argv = [str(CONFER), *args, "--config", str(config)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    print(f"$ confer {' '.join(args)} --config {config.name}   (exit {done.returncode})")
    print((done.stdout + done.stderr).rstrip())
    if check and done.returncode != 0:
        raise RuntimeError(f"confer {' '.join(args)} failed with exit {done.returncode}")
    return done


# %% [markdown]
# ## 1. The node's policy
#
# `node.toml` is the steward's: which tables the node publishes (and their
# privacy unit, bounds and public domains), and the `[policy]` the node
# applies to every task, whatever the coordinator says. Here: studies are
# approved automatically when first seen (`approval = "auto"`; the default,
# `"manual"`, makes them wait for the steward), no task may spend more than
# ε = 5, and study `demo` has a budget of ε = 50 at this node.

# %%
config = tomllib.loads(NODE_TOML.read_text())
print(json.dumps(config["policy"], indent=2))
pl.DataFrame(
    {
        "table": list(config["tables"]),
        "privacy_unit": [t.get("privacy_unit") for t in config["tables"].values()],
        "declared columns": [sorted(t.get("columns", {})) for t in config["tables"].values()],
    }
)

# %%
policy = config["policy"]
assert policy["approval"] == "auto" and policy["max_query_epsilon"] == 5.0
assert policy["studies"]["demo"]["budget"] == {"epsilon": 50.0, "delta": 1e-5}
assert config["tables"]["person"]["privacy_unit"] == "person_id"
assert "privacy_unit" not in config["tables"]["concept"]  # the vocabulary is public

# %% [markdown]
# Some activity to look at: the researcher runs a query (the demo already
# ran a few when it started).

# %%
SEX_COUNT = (
    "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = {eps}, delta = 1e-6{extra}) "
    "gender_concept_id, COUNT(*) AS persons FROM person GROUP BY gender_concept_id"
)
result = researcher.sql(SEX_COUNT.format(eps=1.0, extra=""))
print(result.release)
assert result.release.sites == net.sites

# %% [markdown]
# ## 2. Studies, approvals and spending
#
# `confer node studies` lists every study that reached this node: its
# approval state, a budget the steward set (if any; otherwise the policy's),
# what it has spent here in zCDP rho, how many releases, and what the
# coordinator said of it when it first arrived (title, principal
# investigator, ethics reference, requested budget). The steward's command
# reads the node's own ledger: the same figure the researcher sees for this
# site in `SHOW PRIVACY BUDGET`.

# %%
studies = steward("node", "studies").stdout

# %%
assert "demo" in studies and "approved" in studies and "DEMO-0001" in studies
row = next(line for line in studies.splitlines() if line.startswith("| demo "))
spent_here = float(row.split("|")[4])
seen_by_researcher = researcher.budget().filter(pl.col("node") == "site-a")["spent_rho"][0]
assert abs(spent_here - seen_by_researcher) < 1e-9, (spent_here, seen_by_researcher)

# %% [markdown]
# ## 3. The audit log
#
# Every task the node receives is audited: `charged` (the debit, recorded
# before any row is read), `released`, `failed` or `refused` with the reason,
# and so are steward decisions and policy reloads. `confer audit show`
# prints it as a table; `confer audit export` writes JSON lines for tools
# and supervisors. A record holds who asked, for which study, the cost, the
# task id and the SHA-256 of what was released, never the released values.

# %%
export_dir = Path(session.enter_context(tempfile.TemporaryDirectory(prefix="steward-")))


def audit_log() -> pl.DataFrame:
    path = export_dir / "audit.jsonl"
    steward("audit", "export", "--out", str(path))
    return pl.read_ndjson(path).with_columns(pl.from_epoch("at_ms", time_unit="ms").alias("time"))


audit = audit_log()
audit.select("seq", "time", "study", "actor", "kind", "decision", "epsilon", "rho", "reason")

# %%
assert audit["seq"].to_list() == list(range(1, audit.height + 1))
assert {"charged", "released"} <= set(audit["decision"])
# Every DP release was charged first, at the same cost, and the charges add
# up to what the study has spent here. (A `budget` record is a SHOW PRIVACY
# BUDGET answered at no cost.)
charged = audit.filter(pl.col("decision") == "charged")
released = audit.filter((pl.col("decision") == "released") & (pl.col("rho") > 0))
assert released.join(charged, on=["task_id", "rho"], how="anti").height == 0
assert abs(charged.filter(pl.col("study") == "demo")["rho"].sum() - spent_here) < 1e-9
audit.group_by("kind", "decision").agg(pl.len().alias("records"), pl.col("rho").sum()).sort("kind", "decision")

# %% [markdown]
# `confer audit verify` checks the hash chain (each record holds the hash of
# the one before; `audit.head` beside the database holds the newest) and
# that every ledger entry has its audit record.

# %%
verified = steward("audit", "verify").stdout
assert verified.startswith("audit log intact")

# %% [markdown]
# What does it report when someone edits the log? Not on the live node: on
# a copy of its state directory, where a record's cost is set to zero with
# plain SQLite, as an insider hiding a release might.

# %%
state_dir = Path(config["node"]["state_dir"])
copy_dir = export_dir / "state-copy"
copy_dir.mkdir()
with sqlite3.connect(state_dir / "ledger.sqlite") as live, sqlite3.connect(copy_dir / "ledger.sqlite") as copy:
    live.backup(copy)  # a consistent copy while the node runs
shutil.copy(state_dir / "audit.head", copy_dir / "audit.head")
copy_toml = export_dir / "site-a-copy.toml"
copy_toml.write_text(NODE_TOML.read_text().replace(f"state_dir = {json.dumps(str(state_dir))}", f"state_dir = {json.dumps(str(copy_dir))}"))
assert tomllib.loads(copy_toml.read_text())["node"]["state_dir"] == str(copy_dir)

edited_seq = int(released["seq"][0])  # a DP release
with sqlite3.connect(copy_dir / "ledger.sqlite") as db:
    db.execute("UPDATE audit SET rho = 0, epsilon = 0 WHERE seq = ?", (edited_seq,))
tampered = steward("audit", "verify", config=copy_toml, check=False)

# %%
assert tampered.returncode != 0
assert f"record {edited_seq} was edited" in tampered.stderr
assert steward("audit", "verify").returncode == 0  # the live node's log is untouched

# %% [markdown]
# ## 4. Denying a study, and approving it with a budget of one's own
#
# Suppose the study's ethics approval has lapsed. The steward denies it at
# this node, with a reason the researcher will read. The node refuses the
# study's tasks at once (the command writes to the node's ledger; the node
# may keep running).

# %%
denial = steward(
    "node", "deny", "demo", "--reason", "ethics approval DEMO-0001 expired: renew it with the committee", "--by", "steward-site-a"
)
assert "denied at node site-a" in denial.stdout

# %% [markdown]
# The researcher's next query fails with the steward's reason; nothing is
# spent anywhere. By default every site must answer; a researcher who
# accepts an answer without this site can say so with `min_sites`, and the
# release names the missing site.

# %%
try:
    researcher.sql(SEX_COUNT.format(eps=1.0, extra=""))
except confer.PermissionDeniedError as denied:
    print(f"{type(denied).__name__}: {denied.message}")
    assert "denied by this node's data steward" in denied.message and "DEMO-0001 expired" in denied.message
else:
    raise AssertionError("the query was answered")
partial = researcher.sql(SEX_COUNT.format(eps=1.0, extra=", min_sites = 2"))
print(partial.release)
assert partial.release.missing_sites == ["site-a"] and partial.release.sites == ["site-b", "site-c"]

# %% [markdown]
# The committee renews the approval; the steward approves the study again,
# this time with a budget of ε = 10 (at δ = 1e-5) at this node instead of the
# policy's ε = 50. The researcher sees the new budget for this site in
# `SHOW PRIVACY BUDGET`; what was already spent still counts.

# %%
steward("node", "approve", "demo", "--epsilon", "10", "--delta", "1e-5", "--by", "steward-site-a")
budget = researcher.budget().filter(pl.col("node").is_in(net.sites))
budget.select("node", "status", "budget_rho", "spent_rho", "remaining_rho", "remaining_epsilon")

# %%
site_a, site_b = budget.row(0, named=True), budget.row(1, named=True)
assert site_a["status"] == "approved" and site_a["budget_rho"] < site_b["budget_rho"]
assert abs(site_a["spent_rho"] - spent_here) < 1e-9  # the denied query spent nothing here
assert abs(site_a["remaining_rho"] - (site_a["budget_rho"] - site_a["spent_rho"])) < 1e-9
assert "steward-site-a" in audit_log().filter(pl.col("kind") == "study")["actor"].to_list()

# %% [markdown]
# ## 5. Changing the policy while the node runs
#
# The node re-reads `[policy]` whenever `node.toml` changes (a file that no
# longer parses keeps the previous policy) and audits both. Here the
# steward lowers the per-task cap from ε = 5 to ε = 1: a query at ε = 2 is
# then refused everywhere, before any node runs it, and one at ε = 1 passes.

# %%
original = NODE_TOML.read_text()
NODE_TOML.write_text(original.replace("max_query_epsilon = 5.0", "max_query_epsilon = 1.0"))
try:
    researcher.sql(SEX_COUNT.format(eps=2.0, extra=""))
except confer.BudgetError as capped:
    print(f"{type(capped).__name__}: {capped.message}")
    assert "per-task cap of epsilon 1" in capped.message
else:
    raise AssertionError("the query was answered")
assert researcher.sql(SEX_COUNT.format(eps=1.0, extra="")).release.sites == net.sites
NODE_TOML.write_text(original)
assert researcher.sql(SEX_COUNT.format(eps=2.0, extra="")).release.sites == net.sites
audit_log().filter(pl.col("kind") == "policy").select("seq", "time", "actor", "decision", "reason")

# %%
policy_records = audit_log().filter(pl.col("kind") == "policy")
assert policy_records.height >= 2 and (policy_records["decision"] == "recorded").all()

# %% [markdown]
# ## 6. Charged failures and lifting a block
#
# A task that passed every check but fails while it runs (out of memory, over
# the time limit) is charged anyway, at least the policy's floor: otherwise
# whether a query fails could reveal something about one person for free.
# After `max_failures_per_researcher` such failures (3 by default) the node
# refuses that researcher until the steward has reviewed them and lifts the
# block. The local federation has no failed task to show, so `failures`
# reports none; the `lift` is shown for its form and its audit record.

# %%
failures = steward("node", "failures").stdout
assert "no task has failed" in failures
steward("node", "lift", "--researcher", "researcher", "--reason", "reviewed: no charged failures", "--by", "steward-site-a")
lifts = audit_log().filter(pl.col("kind") == "lift")
assert lifts.height == 1 and lifts["actor"][0] == "steward-site-a" and "researcher researcher" in lifts["reason"][0]
lifts.select("seq", "time", "actor", "decision", "reason")

# %% [markdown]
# ## 7. The node's secure-aggregation identity
#
# For secure aggregation (of queries with `aggregation = 'secure'` and of
# training rounds) each node proves itself to its peers with an identity
# key. `confer node identity` prints this node's public key, which the
# other stewards pin in their `policy.secure.peers` (or which the network's
# certificates vouch for).

# %%
identity = steward("node", "identity").stdout.strip()
assert len(identity) == 64 and all(c in "0123456789abcdef" for c in identity)

# %% [markdown]
# ## What a steward cannot do here yet
#
# * There is no steward API in the Python client and no web console: these
#   are commands on the node's machine, reading its ledger directly.
# * The local federation approves studies automatically; with
#   `approval = "manual"` a new study would wait as `pending` in
#   `confer node studies` until `confer node approve`.
# * Supervision statistics for a regional commission (indicators, tiers,
#   red-line breaches) do not exist yet.
#
# The final check: after all of the above the audit chain is still intact.

# %%
assert steward("audit", "verify").stdout.startswith("audit log intact")
session.close()
assert researcher.closed
print(f"notebook ran in {time.monotonic() - started:.0f} s")
