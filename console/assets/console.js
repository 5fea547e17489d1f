// confer console: what every page shares (the API client, language,
// the top bar, tables, number formats). Pages add their own script.
"use strict";

const STRINGS = {
  en: {
    sign_in_title: "Sign in to confer", sign_in: "Sign in", sign_out: "Sign out",
    sign_in_help: "Paste the token an administrator gave you (the same token as for Flight SQL and the confer CLI).",
    commission: "Commission", researcher: "Research", ops: "Operations",
    period: "Period", indicator: "Indicator", unit: "Org unit", level: "Level",
    trend: "Trend", compare: "Units compared", pivot: "Indicators by unit", tree: "Region",
    insufficient: "insufficient data", incomplete: "incomplete", red_line: "red line", target: "target",
    value: "Value", interval: "Interval", export_csv: "Export CSV", export_xlsx: "Export Excel",
    no_periods: "No period has been released yet: run `confer supervision run --period YYYY-MM`.",
    studies: "Studies", budget: "Budget per node (epsilon)", spent: "spent", remaining: "remaining",
    history: "Query history", query: "Query", explain: "Explain (free)", run: "Run (spends budget)",
    explain_first: "Explain the query first: running it spends budget.",
    jobs: "Training jobs", rounds: "rounds", nodes: "Nodes", status: "Coordinator",
    healthy: "healthy", down: "down", latency: "latency (ms)", version: "version",
    last_contact: "last contact", refresh: "Check now", cost: "cost", sites: "sites",
    when: "when", statement: "statement", result: "result", study: "study", state: "state",
    none: "none", loading: "loading…", indicators: "Indicators",
    steward: "Steward", pending: "Studies", approve: "Approve", deny: "Deny", reason: "reason",
    spend: "Spending over time (rho)", by_researcher: "Spent per researcher over time (rho)", node_budget: "node budget",
    tasks: "Recent tasks", failures: "Charged failures", lift: "Lift", blocked: "blocked", audit_chain: "Audit chain",
  },
  zh: {
    sign_in_title: "登录 confer", sign_in: "登录", sign_out: "退出",
    sign_in_help: "粘贴管理员发给您的令牌（与 Flight SQL 和 confer 命令行相同）。",
    commission: "卫健委", researcher: "科研", ops: "运维",
    period: "统计期", indicator: "指标", unit: "机构", level: "层级",
    trend: "趋势", compare: "机构对比", pivot: "指标 × 机构", tree: "区域",
    insufficient: "数据不足", incomplete: "不完整", red_line: "红线", target: "目标",
    value: "值", interval: "区间", export_csv: "导出 CSV", export_xlsx: "导出 Excel",
    no_periods: "尚未发布任何统计期：请运行 `confer supervision run --period YYYY-MM`。",
    studies: "研究", budget: "各节点预算（epsilon）", spent: "已用", remaining: "剩余",
    history: "查询记录", query: "查询", explain: "解释（免费）", run: "运行（消耗预算）",
    explain_first: "请先解释查询：运行会消耗预算。",
    jobs: "训练任务", rounds: "轮", nodes: "节点", status: "协调器",
    healthy: "正常", down: "不可用", latency: "延迟（毫秒）", version: "版本",
    last_contact: "最后联系", refresh: "立即检查", cost: "成本", sites: "站点",
    when: "时间", statement: "语句", result: "结果", study: "研究", state: "状态",
    none: "无", loading: "加载中…", indicators: "指标",
    steward: "数据管理员", pending: "研究", approve: "批准", deny: "拒绝", reason: "理由",
    spend: "预算消耗（rho）", by_researcher: "各研究者累计消耗（rho）", node_budget: "节点预算",
    tasks: "最近任务", failures: "计费失败", lift: "解除", blocked: "已阻止", audit_chain: "审计链",
  },
};

let lang = localStorage.getItem("confer.lang")
  || ((navigator.language || "").toLowerCase().startsWith("zh") ? "zh" : "en");

function t(key) {
  return (STRINGS[lang] && STRINGS[lang][key]) || STRINGS.en[key] || key;
}

function setLang(l) {
  lang = l;
  localStorage.setItem("confer.lang", l);
  document.documentElement.lang = l === "zh" ? "zh-CN" : "en";
  document.querySelectorAll("[data-t]").forEach((e) => { e.textContent = t(e.dataset.t); });
  document.dispatchEvent(new CustomEvent("confer:lang"));
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// Calls the console's JSON API. Without a session, back to the sign-in page.
async function api(path, options = {}) {
  const init = { credentials: "same-origin", headers: {} };
  if (options.body !== undefined) {
    init.method = options.method || "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.body);
  } else if (options.method) {
    init.method = options.method;
  }
  const r = await fetch(path, init);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    if (r.status === 401 && document.body.dataset.page !== "login") {
      location.href = "/login?next=" + encodeURIComponent(location.pathname);
    }
    throw new ApiError(r.status, body.error || r.statusText);
  }
  return body;
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function fmt(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "";
  if (typeof v !== "number") return String(v);
  const d = digits !== undefined ? digits : (Math.abs(v) >= 100 || Number.isInteger(v) ? 0 : 2);
  return v.toLocaleString(lang === "zh" ? "zh-CN" : "en-US", { maximumFractionDigits: d, minimumFractionDigits: 0 });
}

function fmtTime(ms) {
  if (!ms) return "";
  return new Date(ms).toLocaleString(lang === "zh" ? "zh-CN" : "en-GB");
}

// A table of `columns` (names) and `rows` (arrays); `cell(value, row, i)`
// may return a node or text.
function dataTable(columns, rows, cell) {
  const head = el("tr", {}, columns.map((c) => el("th", {}, c)));
  const body = rows.map((r) => el("tr", {}, r.map((v, i) => {
    const content = cell ? cell(v, r, i) : v;
    if (content instanceof Node && content.tagName === "TD") return content;
    return el("td", { class: typeof v === "number" ? "num" : null },
      content instanceof Node ? content : (typeof content === "number" ? fmt(content) : (content ?? "")));
  })));
  return el("table", { class: "data" }, el("thead", {}, head), el("tbody", {}, body));
}

function showError(target, err) {
  target.replaceChildren(el("p", { class: "error", role: "alert" }, err.message || String(err)));
}

// The top bar: the areas the user's role opens, language, sign out.
async function topBar(active) {
  const me = await api("/api/v1/whoami");
  const links = { commission: "/commission", researcher: "/researcher", ops: "/ops", steward: "/steward" };
  const nav = el("nav", {}, me.areas.map((a) =>
    el("a", { href: links[a], class: a === active ? "active" : null, "data-t": a }, t(a))));
  const bar = el("header", { class: "top" },
    el("span", { class: "brand" }, "confer"), nav, el("span", { class: "spacer" }),
    el("span", { id: "whoami" }, `${me.name} · ${me.role}`),
    el("button", { id: "lang-toggle", onclick: () => setLang(lang === "zh" ? "en" : "zh") }, lang === "zh" ? "English" : "中文"),
    el("button", { id: "sign-out", "data-t": "sign_out", onclick: async () => {
      await api("/api/v1/session", { method: "DELETE" }).catch(() => {});
      location.href = "/login";
    } }, t("sign_out")));
  document.body.prepend(bar);
  document.addEventListener("confer:lang", () => {
    const b = document.getElementById("lang-toggle");
    if (b) b.textContent = lang === "zh" ? "English" : "中文";
  });
  return me;
}

function chart(id) {
  const node = document.getElementById(id);
  const existing = echarts.getInstanceByDom(node);
  const c = existing || echarts.init(node, null, { renderer: "canvas" });
  window.addEventListener("resize", () => c.resize());
  window.confer.charts[id] = c;
  return c;
}

async function loginPage() {
  const form = document.getElementById("login-form");
  const toggle = document.getElementById("lang-toggle");
  toggle.textContent = lang === "zh" ? "English" : "中文";
  toggle.addEventListener("click", () => { setLang(lang === "zh" ? "en" : "zh"); toggle.textContent = lang === "zh" ? "English" : "中文"; });
  // A link `/login#token=...` (printed by `confer demo --serve`) fills the
  // token in; the fragment never reaches the server and is dropped here.
  // Signing in stays a click, so a link from elsewhere cannot sign a
  // browser in as someone else unnoticed.
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("token")) {
    document.getElementById("token").value = fragment.get("token");
    history.replaceState(null, "", location.pathname + location.search);
    document.getElementById("login-button").focus();
  }
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const error = document.getElementById("login-error");
    error.hidden = true;
    try {
      const me = await api("/api/v1/session", { body: { token: document.getElementById("token").value } });
      // Only a path of this console (no scheme, host, backslash or escape).
      const next = new URLSearchParams(location.search).get("next");
      location.href = next && /^\/[A-Za-z0-9_.\/-]*$/.test(next) && !next.startsWith("//") ? next : me.home;
    } catch (e) {
      error.textContent = e.message;
      error.hidden = false;
    }
  });
}

window.confer = { api, ApiError, el, fmt, fmtTime, t, setLang, dataTable, showError, topBar, chart, charts: {}, get lang() { return lang; } };

document.addEventListener("DOMContentLoaded", () => {
  setLang(lang);
  if (document.body.dataset.page === "login") loginPage();
});
