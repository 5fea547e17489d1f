// Research: the user's studies with each node's budget, EXPLAIN PRIVACY
// before spending, query history, training jobs. From /api/v1/studies,
// /api/v1/explain, /api/v1/query, /api/v1/queries, /api/v1/train/jobs.
"use strict";
(() => {
  const C = window.confer;
  const $ = (id) => document.getElementById(id);
  let study = null;
  let explained = null;

  function resultTable(t) {
    if (!t || !t.columns) return C.el("p", { class: "error" }, (t && t.error) || "");
    return C.dataTable(t.columns.map((c) => c.name), t.rows);
  }

  function records(t) {
    return t.rows.map((r) => Object.fromEntries(t.columns.map((c, i) => [c.name, r[i]])));
  }

  async function loadStudy() {
    const s = await C.api(`/api/v1/studies/${encodeURIComponent(study)}`);
    const info = s.study;
    $("study-title").textContent = `${info.name}: ${info.title}`;
    $("study-info").textContent = `PI ${info.principal_investigator} · ethics ${info.ethics_ref} · ` +
      `requested ε ${info.requested_epsilon}, δ ${info.requested_delta}` + (info.tables.length ? ` · ${info.tables.join(", ")}` : "");
    if (!s.budget) {
      $("budget-table").replaceChildren(C.el("p", { class: "error" }, s.budget_error || ""));
      return;
    }
    const rows = records(s.budget);
    // One row per node, then the network's worst case.
    const nodes = rows.filter((r) => !r.node.startsWith("network"));
    $("budget-table").replaceChildren(C.dataTable(
      ["node", C.t("state"), `ε ${C.t("spent")}`, `ε ${C.t("remaining")}`, "ρ budget", "ρ spent", "releases"],
      rows.map((r) => [r.node, r.status, r.spent_epsilon, r.remaining_epsilon, r.budget_rho, r.spent_rho, r.releases])));
    $("budget-table").querySelector("table").id = "budget-rows";
    const c = C.chart("budget-chart");
    c.setOption({
      animation: false,
      tooltip: { trigger: "axis" },
      legend: { data: [C.t("spent"), C.t("remaining")] },
      xAxis: { type: "category", data: nodes.map((r) => r.node) },
      yAxis: { type: "value", name: "ε" },
      series: [
        { id: "spent", name: C.t("spent"), type: "bar", stack: "b", data: nodes.map((r) => r.spent_epsilon), itemStyle: { color: "#c0392b" } },
        { id: "remaining", name: C.t("remaining"), type: "bar", stack: "b", data: nodes.map((r) => r.remaining_epsilon), itemStyle: { color: "#1f5f8b" } },
      ],
    }, true);
  }

  async function loadHistory() {
    const { queries } = await C.api(`/api/v1/queries?study=${encodeURIComponent(study)}`);
    $("history").replaceChildren(queries.length ? C.dataTable(
      [C.t("when"), C.t("statement"), `${C.t("cost")} (ε, δ)`, C.t("sites"), C.t("result")],
      queries.map((q) => [C.fmtTime(q.created_ms), q.statement || q.query_id, q.epsilon === null ? "" : `${q.epsilon}, ${q.delta}`, q.sites.join(", "), q]),
      (v, r, i) => {
        if (i === 1) return C.el("pre", { class: "sql" }, v);
        if (i === 4) {
          const n = v.result && v.result.rows ? v.result.rows.length : 0;
          return C.el("details", { "data-query": v.query_id }, C.el("summary", {}, `${n} rows`), resultTable(v.result));
        }
        return v;
      }) : C.el("p", { class: "muted" }, C.t("none")));
  }

  async function loadJobs() {
    const { jobs } = await C.api("/api/v1/train/jobs");
    const mine = jobs.filter((j) => j.study === study);
    $("jobs").replaceChildren(mine.length ? C.dataTable(
      ["job", C.t("state"), C.t("rounds"), C.t("sites")],
      mine.map((j) => [j.name, j.state, `${j.round} / ${j.rounds}`, j.sites.join(", ")])) : C.el("p", { class: "muted" }, C.t("none")));
    const job = mine.find((j) => j.history && j.history.length);
    $("train-chart").hidden = !job;
    if (!job) return;
    const c = C.chart("train-chart");
    c.resize();
    const overall = (h, key) => {
      const m = (h.evaluation || []).find((e) => e.site === "overall");
      return m && m[key] !== undefined && m[key] !== null ? m[key] : null;
    };
    const rounds = job.history.map((h) => h.round);
    const series = [{ id: "update_norm", name: "update norm", type: "line", yAxisIndex: 1, data: job.history.map((h) => h.update_norm) }];
    for (const key of ["loss", "accuracy", "auc"]) {
      const data = job.history.map((h) => overall(h, key));
      if (data.some((v) => v !== null)) series.push({ id: key, name: key, type: "line", data });
    }
    c.setOption({
      animation: false,
      title: { text: job.name, textStyle: { fontSize: 13 } },
      tooltip: { trigger: "axis" },
      legend: { data: series.map((s) => s.name) },
      xAxis: { type: "category", data: rounds, name: C.t("rounds") },
      yAxis: [{ type: "value" }, { type: "value", name: "norm" }],
      series,
    }, true);
  }

  async function explain() {
    const sql = $("sql").value.trim();
    $("result-out").replaceChildren();
    try {
      const t = await C.api("/api/v1/explain", { body: { study, sql } });
      $("explain-out").replaceChildren(resultTable(t));
      $("explain-out").querySelector("table").id = "explain-table";
      explained = sql;
      $("run-button").disabled = false;
      $("run-hint").hidden = true;
    } catch (e) {
      C.showError($("explain-out"), e);
      explained = null;
      $("run-button").disabled = true;
    }
  }

  async function run() {
    const sql = $("sql").value.trim();
    if (sql !== explained) { $("run-button").disabled = true; return; }
    $("run-button").disabled = true;
    try {
      const t = await C.api("/api/v1/query", { body: { study, sql } });
      $("result-out").replaceChildren(C.el("h2", {}, C.t("result")), resultTable(t));
      $("result-out").querySelector("table").id = "result-table";
      await Promise.all([loadStudy(), loadHistory()]);
    } catch (e) {
      C.showError($("result-out"), e);
    }
    explained = null;
  }

  async function main() {
    try {
      const me = await C.topBar("researcher");
      const { studies } = await C.api("/api/v1/studies");
      const m = location.pathname.match(/^\/researcher\/studies\/([^/]+)$/);
      study = m ? decodeURIComponent(m[1]) : (studies[0] || {}).name;
      $("studies").replaceChildren(...studies.map((s) => C.el("li", {},
        C.el("a", { href: `/researcher/studies/${encodeURIComponent(s.name)}`, class: s.name === study ? "active" : null }, s.name), " ",
        C.el("span", { class: "muted" }, s.title))));
      if (!study) {
        $("page-error").replaceChildren(C.el("p", { class: "muted" }, `${me.name}: ${C.t("studies")}: ${C.t("none")}`));
        document.body.dataset.ready = "true";
        return;
      }
      $("sql").addEventListener("input", () => {
        const same = $("sql").value.trim() === explained;
        $("run-button").disabled = !same;
        $("run-hint").hidden = same;
      });
      $("explain-button").addEventListener("click", explain);
      $("run-button").addEventListener("click", run);
      document.addEventListener("confer:lang", () => { loadStudy(); loadHistory(); loadJobs(); });
      await Promise.all([loadStudy(), loadHistory(), loadJobs()]);
      document.body.dataset.ready = "true";
    } catch (e) {
      C.showError($("page-error"), e);
      document.body.dataset.ready = "error";
    }
  }
  document.addEventListener("DOMContentLoaded", main);
})();
