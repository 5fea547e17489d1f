// The commission's dashboard: supervision indicators per org unit and
// period, from /api/v1/supervision and /api/v1/supervision/values.
"use strict";
(() => {
  const C = window.confer;
  const $ = (id) => document.getElementById(id);
  let meta = null;
  let values = [];
  const sel = { period: null, indicator: null, unit: null };
  const expanded = new Set();

  const name = (o) => (o ? (C.lang === "zh" ? o.name_zh : o.name_en) : "");
  // Tooltips are HTML: text from the region and the catalogue is escaped.
  const html = (text) => echarts.format.encodeHTML(String(text ?? ""));
  const unitByCode = () => Object.fromEntries(meta.org_units.map((u) => [u.code, u]));
  const indicatorById = () => Object.fromEntries(meta.indicators.map((i) => [i.id, i]));
  const children = (code) => meta.org_units.filter((u) => u.parent === code);
  const roots = () => meta.org_units.filter((u) => !u.parent);
  const periodKind = (p) => (/^\d{4}-\d{2}$/.test(p) ? "month" : /^\d{4}-Q\d$/.test(p) ? "quarter" : "year");

  // The total (no disaggregation) of one indicator at one unit and period.
  function row(period, indicator, unit) {
    return values.find((v) => v.period === period && v.indicator === indicator && v.unit === unit && v.category === "") || null;
  }
  const flags = (r) => (r && r.flags ? r.flags.split(",").map((s) => s.trim()) : []);
  const insufficient = (r) => r && r.value === null;
  const breach = (r) => flags(r).includes("red line");

  function cellText(r, ind) {
    if (!r) return "";
    if (insufficient(r)) return C.t("insufficient");
    return C.fmt(r.value, ind && ind.factor === 100 ? 1 : undefined) + (ind && ind.unit ? " " + ind.unit : "");
  }

  function cellClass(r) {
    return [insufficient(r) ? "insufficient" : "", breach(r) ? "breach" : "", flags(r).includes("incomplete") ? "incomplete" : ""]
      .filter(Boolean).join(" ");
  }

  function indicatorsOfPeriod(period) {
    const ids = new Set(values.filter((v) => v.period === period).map((v) => v.indicator));
    return meta.indicators.filter((i) => ids.has(i.id));
  }

  function fillSelects() {
    const p = $("period");
    p.replaceChildren(...meta.periods.slice().reverse().map((r) =>
      C.el("option", { value: r.period, selected: r.period === sel.period }, r.period + (r.complete ? "" : " *"))));
    const i = $("indicator");
    i.replaceChildren(...indicatorsOfPeriod(sel.period).map((ind) =>
      C.el("option", { value: ind.id, selected: ind.id === sel.indicator }, name(ind))));
    const info = meta.periods.find((r) => r.period === sel.period);
    $("period-note").textContent = info && !info.complete
      ? `${C.t("incomplete")}: ${info.missing_nodes || ""}` : "";
  }

  function renderTree() {
    const make = (u) => {
      const kids = children(u.code);
      const open = expanded.has(u.code);
      const r = row(sel.period, sel.indicator, u.code);
      const label = C.el("span", {
        class: "node" + (u.code === sel.unit ? " selected" : ""), "data-code": u.code, "data-level": u.level,
        onclick: () => { sel.unit = u.code; expanded.add(u.code); render(); },
      }, name(u), " ", breach(r) ? C.el("span", { class: "badge bad", title: C.t("red_line") }, "!") : null,
      insufficient(r) ? C.el("span", { class: "badge" }, "–") : null);
      const toggle = C.el("span", {
        class: "toggle", onclick: () => { if (open) expanded.delete(u.code); else expanded.add(u.code); renderTree(); },
      }, kids.length ? (open ? "▾" : "▸") : "");
      return C.el("li", {}, toggle, label, kids.length && open ? C.el("ul", {}, kids.map(make)) : null);
    };
    $("tree").replaceChildren(...roots().map(make));
  }

  function renderKpis() {
    const u = unitByCode()[sel.unit];
    $("unit-title").textContent = `${name(u)} (${u.code}) · ${sel.period}`;
    $("kpis").replaceChildren(...indicatorsOfPeriod(sel.period).map((ind) => {
      const r = row(sel.period, ind.id, sel.unit);
      return C.el("div", { class: "kpi " + cellClass(r), "data-indicator": ind.id },
        C.el("div", { class: "name" }, name(ind)),
        C.el("div", { class: "value" }, r ? cellText(r, ind) : "—"),
        r && r.ci_low !== null && r.value !== null
          ? C.el("div", { class: "muted" }, `[${C.fmt(r.ci_low)}, ${C.fmt(r.ci_high)}]`) : null);
    }));
  }

  function markLines(ind) {
    const data = [];
    if (ind.red_line !== null) data.push({ yAxis: ind.red_line, name: C.t("red_line"), lineStyle: { color: "#c0392b", type: "dashed" }, label: { formatter: C.t("red_line") + " {c}" } });
    if (ind.target !== null) data.push({ yAxis: ind.target, name: C.t("target"), lineStyle: { color: "#1e7b34", type: "dotted" }, label: { formatter: C.t("target") + " {c}" } });
    return { symbol: "none", data, silent: true };
  }

  function renderTrend() {
    const ind = indicatorById()[sel.indicator];
    const u = unitByCode()[sel.unit];
    $("trend-title").textContent = `${name(ind)} · ${name(u)}`;
    const kind = periodKind(sel.period);
    const periods = meta.periods.map((p) => p.period).filter((p) => periodKind(p) === kind).sort();
    const rows = periods.map((p) => row(p, sel.indicator, sel.unit));
    const val = rows.map((r) => (r && r.value !== null ? r.value : null));
    const lo = rows.map((r) => (r && r.value !== null ? r.ci_low : null));
    const band = rows.map((r) => (r && r.value !== null ? r.ci_high - r.ci_low : null));
    const c = C.chart("trend-chart");
    c.setOption({
      animation: false,
      tooltip: { trigger: "axis", formatter: (ps) => {
        const i = ps[0].dataIndex;
        const r = rows[i];
        return `${html(periods[i])}<br>${html(cellText(r, ind) || "—")}` + (r && r.value !== null ? `<br>[${html(C.fmt(r.ci_low))}, ${html(C.fmt(r.ci_high))}]` : "");
      } },
      legend: { data: [C.t("value"), C.t("interval")] },
      xAxis: { type: "category", data: periods },
      yAxis: { type: "value", name: ind.unit, scale: true },
      series: [
        { id: "ci_low", name: "ci_low", type: "line", data: lo, stack: "ci", symbol: "none", lineStyle: { opacity: 0 }, silent: true },
        { id: "ci_band", name: C.t("interval"), type: "line", data: band, stack: "ci", symbol: "none", lineStyle: { opacity: 0 }, areaStyle: { color: "#1f5f8b", opacity: 0.18 }, silent: true },
        { id: "value", name: C.t("value"), type: "line", data: val, symbolSize: 8, connectNulls: false, lineStyle: { color: "#1f5f8b" }, itemStyle: { color: "#1f5f8b" },
          markLine: markLines(ind),
          markPoint: { data: rows.map((r, i) => (insufficient(r) ? { coord: [i, 0], value: C.t("insufficient"), symbol: "pin", itemStyle: { color: "#8a9299" } } : null)).filter(Boolean) } },
      ],
    }, true);
  }

  // The units compared: the selected unit's children, or its siblings.
  function comparedUnits() {
    const u = unitByCode()[sel.unit];
    const kids = children(u.code);
    if (kids.length) return { units: kids, parent: u };
    const parent = u.parent ? unitByCode()[u.parent] : null;
    return { units: parent ? children(parent.code) : [u], parent };
  }

  function renderCompare() {
    const ind = indicatorById()[sel.indicator];
    const { units, parent } = comparedUnits();
    $("compare-title").textContent = `${name(ind)}` + (parent ? ` · ${name(parent)}` : "");
    const rows = units.map((u) => row(sel.period, sel.indicator, u.code));
    const c = C.chart("compare-chart");
    c.setOption({
      animation: false,
      tooltip: { trigger: "axis", formatter: (ps) => {
        const i = ps[0].dataIndex;
        const r = rows[i];
        return `${html(name(units[i]))}<br>${html(cellText(r, ind) || "—")}` + (r && r.value !== null ? `<br>[${html(C.fmt(r.ci_low))}, ${html(C.fmt(r.ci_high))}]` : "");
      } },
      grid: { bottom: 80 },
      xAxis: { type: "category", data: units.map(name), axisLabel: { rotate: units.length > 6 ? 30 : 0 } },
      yAxis: { type: "value", name: ind.unit },
      series: [{
        id: "value", name: C.t("value"), type: "bar",
        data: rows.map((r) => ({
          value: r && r.value !== null ? r.value : null,
          itemStyle: { color: breach(r) ? "#c0392b" : "#1f5f8b" },
          label: insufficient(r) ? { show: true, position: "insideBottom", formatter: C.t("insufficient"), color: "#8a9299" } : undefined,
        })),
        markLine: markLines(ind),
      }, {
        id: "interval", name: C.t("interval"), type: "custom",
        renderItem: (params, api) => {
          const lo = api.value(1); const hi = api.value(2);
          if (lo === null || hi === null || Number.isNaN(lo)) return null;
          const a = api.coord([api.value(0), lo]); const b = api.coord([api.value(0), hi]);
          const w = 6;
          return { type: "group", children: [
            { type: "line", shape: { x1: a[0], y1: a[1], x2: b[0], y2: b[1] }, style: { stroke: "#333" } },
            { type: "line", shape: { x1: a[0] - w, y1: a[1], x2: a[0] + w, y2: a[1] }, style: { stroke: "#333" } },
            { type: "line", shape: { x1: b[0] - w, y1: b[1], x2: b[0] + w, y2: b[1] }, style: { stroke: "#333" } },
          ] };
        },
        data: rows.map((r, i) => [i, r && r.value !== null ? r.ci_low : null, r && r.value !== null ? r.ci_high : null]),
        z: 10, silent: true,
      }],
    }, true);
    c.compared = units.map((u) => u.code);
  }

  function exportHref(format) {
    const u = unitByCode()[sel.unit];
    const kids = children(u.code);
    const level = kids.length ? kids[0].level : u.level;
    const q = new URLSearchParams({ period: sel.period, under: u.code, level, format, lang: C.lang });
    return "/api/v1/supervision/export?" + q.toString();
  }

  function renderPivot() {
    const u = unitByCode()[sel.unit];
    const cols = [u, ...children(u.code)];
    const inds = indicatorsOfPeriod(sel.period);
    const head = C.el("tr", {}, C.el("th", {}, C.t("indicator")), cols.map((c) => C.el("th", { "data-unit": c.code }, name(c))));
    const body = inds.map((ind) => C.el("tr", {},
      C.el("td", {}, name(ind), ind.red_line !== null ? C.el("span", { class: "muted" }, ` (${C.t("red_line")} ${ind.red_line})`) : null),
      cols.map((c) => {
        const r = row(sel.period, ind.id, c.code);
        return C.el("td", {
          class: "num " + cellClass(r), "data-indicator": ind.id, "data-unit": c.code,
          "data-value": r && r.value !== null ? String(r.value) : (r ? "insufficient" : ""),
          title: r && r.value !== null ? `[${C.fmt(r.ci_low)}, ${C.fmt(r.ci_high)}] ${r.flags}` : (r ? r.flags : ""),
        }, cellText(r, ind));
      })));
    $("pivot").replaceChildren(C.el("table", { class: "data", id: "pivot-table" }, C.el("thead", {}, head), C.el("tbody", {}, body)));
    $("export-csv").href = exportHref("csv");
    $("export-xlsx").href = exportHref("xlsx");
  }

  function render() {
    if (!indicatorsOfPeriod(sel.period).some((i) => i.id === sel.indicator)) {
      sel.indicator = (indicatorsOfPeriod(sel.period)[0] || {}).id;
    }
    fillSelects();
    renderTree();
    renderKpis();
    renderTrend();
    renderCompare();
    renderPivot();
    document.body.dataset.ready = "true";
  }

  async function main() {
    try {
      await C.topBar("commission");
      meta = await C.api("/api/v1/supervision");
      if (!meta.periods.length) {
        $("page-error").replaceChildren(C.el("p", { class: "error" }, C.t("no_periods")));
        document.body.dataset.ready = "true";
        return;
      }
      values = (await C.api("/api/v1/supervision/values")).values;
      sel.period = meta.periods[meta.periods.length - 1].period;
      sel.unit = roots()[0].code;
      expanded.add(sel.unit);
      $("period").addEventListener("change", (e) => { sel.period = e.target.value; render(); });
      $("indicator").addEventListener("change", (e) => { sel.indicator = e.target.value; render(); });
      document.addEventListener("confer:lang", render);
      render();
    } catch (e) {
      C.showError($("page-error"), e);
      document.body.dataset.ready = "error";
    }
  }
  document.addEventListener("DOMContentLoaded", main);
})();
