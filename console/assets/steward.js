// The data steward's page at a node: studies to approve or deny, spending
// against the node's budget, recent tasks, the audit chain, charged
// failures. From /api/v1/node, /studies, /tasks and /failures of the node.
"use strict";
(() => {
  const C = window.confer;
  const $ = (id) => document.getElementById(id);

  function kpi(label, value, cls) {
    return C.el("div", { class: "kpi" }, C.el("div", { class: "name" }, label), C.el("div", { class: "value " + (cls || "") }, value));
  }

  async function decide(study, action, body) {
    $("decision-error").replaceChildren();
    try {
      await C.api(`/api/v1/studies/${encodeURIComponent(study)}/${action}`, { body });
      await load();
    } catch (e) {
      C.showError($("decision-error"), e);
    }
  }

  function studyRow(s) {
    const reason = C.el("input", { type: "text", placeholder: C.t("reason"), class: "deny-reason", "data-study": s.study });
    const epsilon = C.el("input", { type: "text", placeholder: "ε (policy)", size: 8, class: "approve-epsilon", "data-study": s.study });
    const actions = C.el("td", {},
      epsilon, " ",
      C.el("button", { class: "plain approve", "data-study": s.study, onclick: () => {
        const e = parseFloat(epsilon.value);
        decide(s.study, "approve", Number.isFinite(e) ? { epsilon: e, delta: 1e-6 } : {});
      } }, C.t("approve")), " ",
      reason, " ",
      C.el("button", { class: "plain deny", "data-study": s.study, onclick: () => decide(s.study, "deny", { reason: reason.value }) }, C.t("deny")));
    return [s.study, s.status, s.description || "", s.effective_budget_rho, s.spent_rho, s.releases, s.reason || "", actions];
  }

  function spendCharts(charges, node) {
    // Cumulative spending per study, as the ledger charged it.
    const studies = [...new Set(charges.map((c) => c.study || "-"))];
    const totals = {};
    const series = studies.map((s) => ({ id: "study:" + s, name: s, type: "line", step: "end", showSymbol: false, data: [] }));
    let all = 0;
    const total = { id: "total", name: "total", type: "line", step: "end", showSymbol: false, data: [], lineStyle: { width: 3 } };
    for (const c of charges) {
      const s = c.study || "-";
      totals[s] = (totals[s] || 0) + c.rho;
      all += c.rho;
      series[studies.indexOf(s)].data.push([c.at_ms, totals[s]]);
      total.data.push([c.at_ms, all]);
    }
    if (node.node_budget_rho !== null) {
      total.markLine = { symbol: "none", silent: true, data: [{ yAxis: node.node_budget_rho, name: C.t("node_budget"), lineStyle: { color: "#c0392b", type: "dashed" }, label: { formatter: C.t("node_budget") + " {c}" } }] };
    }
    const spend = C.chart("spend-chart");
    spend.setOption({
      animation: false,
      tooltip: { trigger: "axis" },
      legend: { data: [...studies, "total"] },
      xAxis: { type: "time" },
      // The node's budget stays in view.
      yAxis: { type: "value", name: "ρ", max: (v) => Number((Math.max(v.max, node.node_budget_rho || 0) * 1.1).toPrecision(2)) },
      series: [...series, total],
    }, true);
    // Cumulative spending per researcher over time, against what one
    // researcher may spend here over all studies.
    const names = [...new Set(charges.map((c) => c.researcher || "-"))].sort();
    const mine = {};
    const lines = names.map((n) => ({ id: "researcher:" + n, name: n, type: "line", step: "end", showSymbol: false, data: [] }));
    for (const c of charges) {
      const n = c.researcher || "-";
      mine[n] = (mine[n] || 0) + c.rho;
      lines[names.indexOf(n)].data.push([c.at_ms, mine[n]]);
    }
    if (lines.length && node.researcher_total_budget_rho !== null) {
      lines[0].markLine = { symbol: "none", silent: true, data: [{ yAxis: node.researcher_total_budget_rho, lineStyle: { color: "#c0392b", type: "dashed" } }] };
    }
    const byResearcher = C.chart("researcher-chart");
    byResearcher.setOption({
      animation: false,
      tooltip: { trigger: "axis" },
      legend: { data: names },
      xAxis: { type: "time" },
      yAxis: { type: "value", name: "ρ", max: (v) => Number((Math.max(v.max, node.researcher_total_budget_rho || 0) * 1.1).toPrecision(2)) },
      series: lines,
    }, true);
  }

  async function load() {
    const [node, { studies }, tasks, failures] = await Promise.all([
      C.api("/api/v1/node"), C.api("/api/v1/studies"), C.api("/api/v1/tasks?limit=100"), C.api("/api/v1/failures"),
    ]);
    $("node-name").textContent = node.name;
    const audit = node.audit.intact
      ? C.el("span", { class: "ok", id: "audit-status" }, `✓ ${node.audit.records}`)
      : C.el("span", { class: "error", id: "audit-status" }, node.audit.problem);
    $("node-status").replaceChildren(
      kpi(C.t("node_budget") + " (ρ)", node.node_budget_rho === null ? C.t("none") : C.fmt(node.node_budget_rho, 3)),
      kpi(C.t("spent") + " (ρ)", C.fmt(node.spent_rho, 4)),
      kpi(C.t("audit_chain"), audit),
      kpi("approval", node.approval),
      kpi(C.t("version"), node.version));
    $("studies").replaceChildren(studies.length ? C.dataTable(
      [C.t("study"), C.t("state"), "description", "budget ρ", "spent ρ", "releases", C.t("reason"), ""],
      studies.map(studyRow)) : C.el("p", { class: "muted" }, C.t("none")));
    const table = $("studies").querySelector("table");
    if (table) table.id = "studies-table";
    spendCharts(tasks.charges, node);
    $("failures").replaceChildren(failures.researchers.length ? C.dataTable(
      ["researcher", C.t("failures"), "counted", "quota", C.t("state"), ""],
      failures.researchers.map((r) => {
        const reason = C.el("input", { type: "text", placeholder: C.t("reason"), class: "lift-reason" });
        return [r.researcher, r.failures, r.counted, r.quota, r.blocked ? C.t("blocked") : "", C.el("td", {}, reason, " ",
          C.el("button", { class: "plain lift", "data-researcher": r.researcher, onclick: async () => {
            try {
              await C.api(`/api/v1/researchers/${encodeURIComponent(r.researcher)}/lift`, { body: { reason: reason.value } });
              await load();
            } catch (e) { C.showError($("failures"), e); }
          } }, C.t("lift")))];
      })) : C.el("p", { class: "muted" }, C.t("none")));
    $("tasks").replaceChildren(C.dataTable(
      [C.t("when"), "researcher", C.t("study"), "kind", "decision", "ρ", "ε", C.t("reason")],
      tasks.recent.map((r) => [C.fmtTime(r.at_ms), r.researcher || "", r.study || "", r.kind, r.decision, r.rho, r.epsilon, r.reason || ""])));
    $("tasks").querySelector("table").id = "tasks-table";
    document.body.dataset.ready = "true";
  }

  async function main() {
    try {
      await C.topBar("steward");
      document.addEventListener("confer:lang", () => load());
      await load();
    } catch (e) {
      C.showError($("page-error"), e);
      document.body.dataset.ready = "error";
    }
  }
  document.addEventListener("DOMContentLoaded", main);
})();
