// Operations: the coordinator's status and every node's health, from
// /api/v1/status and /api/v1/nodes.
"use strict";
(() => {
  const C = window.confer;
  const $ = (id) => document.getElementById(id);

  function kpi(label, value, cls) {
    return C.el("div", { class: "kpi" }, C.el("div", { class: "name" }, label), C.el("div", { class: "value " + (cls || "") }, value));
  }

  async function load(refresh) {
    const status = await C.api("/api/v1/status");
    const audit = status.audit.intact ? C.el("span", { class: "ok" }, `✓ ${status.audit.records}`) : C.el("span", { class: "error" }, status.audit.problem);
    $("status").replaceChildren(
      kpi(C.t("version"), status.version),
      kpi(C.t("nodes"), `${status.nodes_healthy} / ${status.nodes} ${C.t("healthy")}`, status.nodes_healthy < status.nodes ? "error" : "ok"),
      kpi("audit", audit),
      kpi(C.t("studies"), status.studies),
      kpi(C.t("jobs"), `${status.training_jobs_running} / ${status.training_jobs}`),
      kpi("uptime", `${Math.round(status.uptime_secs / 60)} min`));
    const { nodes } = await C.api("/api/v1/nodes" + (refresh ? "?refresh=true" : ""));
    $("nodes").replaceChildren(C.dataTable(
      ["node", "url", C.t("state"), C.t("latency"), C.t("version"), C.t("last_contact"), "error"],
      nodes.map((n) => [n.name, n.url, n.held ? "held" : (n.healthy ? C.t("healthy") : C.t("down")), n.latency_ms, n.version, C.fmtTime(n.last_seen_ms), n.held || n.error || ""]),
      (v, r, i) => (i === 2 ? C.el("td", { class: "node-state" }, C.el("span", { class: "badge " + (v === C.t("healthy") ? "good" : "bad") }, v)) : v)));
    $("nodes").querySelector("table").id = "nodes-table";
    const c = C.chart("latency-chart");
    c.setOption({
      animation: false,
      tooltip: { trigger: "axis" },
      xAxis: { type: "category", data: nodes.map((n) => n.name) },
      yAxis: { type: "value", name: C.t("latency") },
      series: [{ id: "latency", name: C.t("latency"), type: "bar",
        data: nodes.map((n) => ({ value: n.latency_ms, itemStyle: { color: n.healthy ? "#1f5f8b" : "#c0392b" } })) }],
    }, true);
    document.body.dataset.ready = "true";
  }

  async function main() {
    try {
      await C.topBar("ops");
      $("refresh").addEventListener("click", () => load(true).catch((e) => C.showError($("page-error"), e)));
      document.addEventListener("confer:lang", () => load(false));
      await load(false);
    } catch (e) {
      C.showError($("page-error"), e);
      document.body.dataset.ready = "error";
    }
  }
  document.addEventListener("DOMContentLoaded", main);
})();
