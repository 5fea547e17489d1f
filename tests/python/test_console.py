"""The web console in a real browser: Playwright drives Debian's headless
Chromium (/usr/bin/chromium, installed by deploy/bootstrap.sh) against the
consoles of `confer demo --serve` (the research coordinator's and the
commission's). Every figure a chart or table shows is compared with what
the JSON API returns; roles without an area are refused. Screenshots go to
build/test-artifacts/console/.
"""

import csv
import io
import json
import math
import pathlib
import urllib.error
import urllib.request

import pytest

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = pathlib.Path(__file__).resolve().parents[2] / "build" / "test-artifacts" / "console"
FLAGS = [
    "--no-sandbox",
    "--headless=new",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
]


@pytest.fixture(scope="module")
def browser():
    if not pathlib.Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: deploy/bootstrap.sh installs Debian's chromium")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def api(base, path, token=None, body=None, method=None):
    """Calls the console's JSON API directly (as a script would)."""
    headers = {}
    data = None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode()
    req = urllib.request.Request(base + path.lstrip("/"), data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read()
            kind = r.headers.get("Content-Type", "")
            return r.status, (json.loads(raw) if kind.startswith("application/json") else raw), r.headers
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw), e.headers
        except ValueError:
            return e.code, raw.decode(errors="replace"), e.headers


def sign_in(browser, base, token, expect_path):
    """Signs in through the login page's form, as a person would."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1600})
    page = ctx.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base + "login")
    page.fill("#token", token)
    page.click("#login-button")
    page.wait_for_url(base + expect_path.lstrip("/"))
    page.wait_for_selector("body[data-ready]", timeout=60_000)
    assert page.get_attribute("body", "data-ready") == "true", page.inner_text("#page-error")
    return ctx, page, errors


def series(page, chart, sid):
    return page.evaluate(
        "([c, s]) => window.confer.charts[c].getOption().series.find((x) => x.id === s).data"
        ".map((d) => (d !== null && typeof d === 'object' && !Array.isArray(d)) ? d.value : d)",
        [chart, sid],
    )


def close(a, b):
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def test_commission_dashboard_shows_what_the_api_returns(federation, browser):
    base, token = federation["commission_console"], federation["analyst_token"]
    status, meta, _ = api(base, "api/v1/supervision", token)
    assert status == 200, meta
    period = meta["periods"][-1]["period"]
    status, body, _ = api(base, f"api/v1/supervision/values?period={period}", token)
    assert status == 200
    values = body["values"]
    levels = {u["level"] for u in meta["org_units"]}
    # Last month's indicators are released for every level of the region.
    assert {v["level"] for v in values} == levels == {"city", "county", "township", "village"}
    totals = {(v["indicator"], v["unit"]): v for v in values if v["category"] == ""}

    ctx, page, errors = sign_in(browser, base, token, "/commission")
    assert page.input_value("#period") == period
    root = next(u for u in meta["org_units"] if not u["parent"])
    indicator = page.input_value("#indicator")

    # The trend: the value series holds the API's value for each month
    # released (the fixture releases two), the band its interval.
    months = sorted(p["period"] for p in meta["periods"] if len(p["period"]) == len(period))
    assert len(months) >= 2
    trend = series(page, "trend-chart", "value")
    low = series(page, "trend-chart", "ci_low")
    band = series(page, "trend-chart", "ci_band")
    assert len(trend) == len(months)
    for i, month in enumerate(months):
        status, body, _ = api(base, f"api/v1/supervision/values?period={month}&indicator={indicator}&unit={root['code']}&category=", token)
        (released,) = body["values"]
        assert close(trend[i], released["value"]), month
        if released["value"] is not None:
            assert close(low[i], released["ci_low"]) and close(low[i] + band[i], released["ci_high"])

    # Drill down city → county → township → village, checking the bars
    # (children compared) and the pivot cells against the API at each step.
    unit = root
    for depth in range(3):
        kids = [u for u in meta["org_units"] if u["parent"] == unit["code"]]
        assert kids, f"{unit['code']} has no children"
        compared = page.evaluate("() => window.confer.charts['compare-chart'].compared")
        assert compared == [k["code"] for k in kids]
        bars = series(page, "compare-chart", "value")
        for k, bar in zip(kids, bars):
            assert close(bar, totals[(indicator, k["code"])]["value"]), (k["code"], bar)
        for cell in page.query_selector_all("#pivot-table td[data-unit]"):
            key = (cell.get_attribute("data-indicator"), cell.get_attribute("data-unit"))
            shown = cell.get_attribute("data-value")
            released = totals.get(key)
            if released is None:
                assert shown == ""
            elif released["value"] is None:
                # Insufficient data is shown as such, never as a number.
                assert shown == "insufficient" and cell.inner_text() == "insufficient data"
                assert "insufficient data" in released["flags"]
            else:
                assert close(float(shown), released["value"]), key
                if "red line" in released["flags"]:
                    assert "breach" in cell.get_attribute("class")
        page.screenshot(path=str(ARTIFACTS / f"commission-{unit['level']}.png"), full_page=True)
        unit = kids[0]
        page.click(f"#tree .node[data-code='{unit['code']}']")
        page.wait_for_selector(f"#tree .node.selected[data-code='{unit['code']}']")
    assert unit["level"] == "village"
    assert page.input_value("#indicator") == indicator

    # A red-line indicator: the breach markers match the flags.
    red = [i for i in meta["indicators"] if i["red_line"] is not None]
    assert red
    page.select_option("#indicator", red[0]["id"])
    mark = page.evaluate(
        "() => window.confer.charts['compare-chart'].getOption().series[0].markLine.data.map((d) => d.yAxis)"
    )
    assert red[0]["red_line"] in mark

    # The pivot exports as CSV (the same cells) and as Excel.
    csv_href = page.get_attribute("#export-csv", "href")
    response = page.request.get(base + csv_href.lstrip("/"))
    assert response.status == 200
    rows = list(csv.reader(io.StringIO(response.text())))
    header, data = rows[0], rows[1:]
    assert header[:4] == ["indicator_id", "indicator", "unit", "red_line"]
    for row in data:
        for code_name, cell in zip(header[4:], row[4:]):
            released = totals.get((row[0], code_name.split(" ")[0]))
            if released is not None and released["value"] is None:
                assert cell == "insufficient data"
            elif released is not None:
                assert close(float(cell), released["value"])
    xlsx = page.request.get(base + page.get_attribute("#export-xlsx", "href").lstrip("/"))
    assert xlsx.status == 200 and xlsx.body()[:2] == b"PK"
    assert "spreadsheetml" in xlsx.headers["content-type"]

    # Chinese: names come from the API's name_zh.
    page.click("#lang-toggle")
    zh = {i["id"]: i["name_zh"] for i in meta["indicators"]}
    assert page.eval_on_selector("#indicator", "s => s.options[s.selectedIndex].text") == zh[red[0]["id"]]
    page.screenshot(path=str(ARTIFACTS / "commission-zh.png"), full_page=True)
    assert not errors, errors
    ctx.close()


def test_researcher_explains_then_runs_and_sees_budget_and_history(federation, browser):
    base, token = federation["console"], federation["token"]
    ctx, page, errors = sign_in(browser, base, token, "/researcher")
    status, study, _ = api(base, "api/v1/studies/demo", token)
    assert status == 200
    cols = [c["name"] for c in study["budget"]["columns"]]
    nodes = [dict(zip(cols, r)) for r in study["budget"]["rows"] if not r[0].startswith("network")]
    spent = series(page, "budget-chart", "spent")
    assert len(spent) == len(nodes) == 3
    for bar, node in zip(spent, nodes):
        assert close(bar, node["spent_epsilon"])

    sql = (
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.5, delta = 1e-6) "
        "gender_concept_id, COUNT(*) AS persons FROM person GROUP BY gender_concept_id"
    )
    assert page.is_disabled("#run-button")
    page.fill("#sql", sql)
    page.click("#explain-button")
    page.wait_for_selector("#explain-table")
    assert "0.5" in page.inner_text("#explain-table")
    page.click("#run-button")
    page.wait_for_selector("#result-table")
    result_rows = page.query_selector_all("#result-table tbody tr")
    assert len(result_rows) >= 2
    # The history now starts with it, with its cost and sites.
    status, history, _ = api(base, "api/v1/queries?study=demo", token)
    newest = history["queries"][0]
    assert newest["statement"] == sql and newest["epsilon"] == 0.5
    assert newest["sites"] == ["site-a", "site-b", "site-c"]
    page.wait_for_selector(f"#history details[data-query='{newest['query_id']}']")
    # ... and the budget chart shows what it spent.
    status, after, _ = api(base, "api/v1/studies/demo", token)
    nodes_after = [dict(zip(cols, r)) for r in after["budget"]["rows"] if not r[0].startswith("network")]
    page.wait_for_function(
        "(v) => Math.abs(window.confer.charts['budget-chart'].getOption().series[0].data[0] - v) < 1e-9",
        arg=nodes_after[0]["spent_epsilon"],
    )
    assert nodes_after[0]["spent_epsilon"] > nodes[0]["spent_epsilon"]
    page.screenshot(path=str(ARTIFACTS / "researcher.png"), full_page=True)
    assert not errors, errors
    ctx.close()


def test_operations_page_shows_each_node(federation, browser):
    base, token = federation["console"], federation["admin_token"]
    ctx, page, errors = sign_in(browser, base, token, "/ops")
    status, body, _ = api(base, "api/v1/nodes", token)
    assert status == 200
    names = page.evaluate(
        "() => window.confer.charts['latency-chart'].getOption().xAxis[0].data"
    )
    assert names == [n["name"] for n in body["nodes"]] == ["site-a", "site-b", "site-c"]
    assert page.inner_text("#nodes-table").count("healthy") == 3
    page.screenshot(path=str(ARTIFACTS / "ops.png"), full_page=True)
    assert not errors, errors
    ctx.close()


def test_without_the_role_or_a_session_nothing_is_shown(federation, browser):
    research, commission = federation["console"], federation["commission_console"]
    # No session: pages go to the sign-in page, the API answers 401.
    for base, path in [(research, "researcher"), (research, "ops"), (commission, "commission")]:
        status, body, headers = api(base, "api/v1/whoami")
        assert status == 401 and "sign in" in body["error"]
        ctx = browser.new_context()
        page = ctx.new_page()
        page.goto(base + path)
        assert page.url.startswith(base + "login"), page.url
        ctx.close()
    assert api(research, "api/v1/studies", "cft_not_a_token")[0] == 401
    # A wrong token on the login page: a clear message, no session.
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(research + "login")
    page.fill("#token", "cft_wrong")
    page.click("#login-button")
    page.wait_for_selector("#login-error:not([hidden])")
    assert "unknown or revoked" in page.inner_text("#login-error")
    ctx.close()

    # A researcher on the operations page: 403 and a page that says why.
    ctx, page, _ = sign_in(browser, research, federation["token"], "/researcher")
    response = page.goto(research + "ops")
    assert response.status == 403
    assert "needs the admin role" in page.inner_text("#error-message")
    page.screenshot(path=str(ARTIFACTS / "refused.png"))
    # A study the researcher is not in: 404, whether or not it exists.
    assert page.goto(research + "researcher/studies/no_such_study").status == 404
    assert api(research, "api/v1/studies/no_such_study", federation["token"])[0] == 404
    assert api(research, "api/v1/nodes", federation["token"])[0] == 403
    # Signing out ends the session at the server.
    page.goto(research + "researcher")
    page.wait_for_selector("body[data-ready]")
    page.click("#sign-out")
    page.wait_for_url(research + "login")
    assert page.goto(research + "researcher").url.startswith(research + "login")
    ctx.close()

    # The analyst at the commission's coordinator has no research pages.
    analyst = federation["analyst_token"]
    status, body, _ = api(commission, "api/v1/studies", analyst)
    assert status == 403 and "needs the researcher, data_scientist or admin role" in body["error"]
    status, body, _ = api(commission, "api/v1/supervision/values", federation["token"])
    assert status == 401  # a token of the other coordinator
    # Pages are only served by their routes, after authentication.
    assert api(commission, "assets/commission.html")[0] == 404
    assert api(commission, "assets/echarts.min.js")[0] == 200


def test_steward_page_at_a_node(federation, browser):
    base, token = federation["stewards"]["site-c"]
    # Without the steward token: nothing.
    assert api(base, "api/v1/studies")[0] == 401
    assert api(base, "api/v1/studies", federation["token"])[0] == 401  # a researcher's token
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(base + "steward")
    assert page.url.startswith(base + "login")
    ctx.close()

    ctx, page, errors = sign_in(browser, base, token, "/steward")
    status, tasks, _ = api(base, "api/v1/tasks", token)
    assert status == 200 and tasks["charges"]
    # Spending: the total line ends at the sum of every charge; each
    # researcher's bar is what they were charged.
    total = series(page, "spend-chart", "total")
    assert close(total[-1][1], sum(c["rho"] for c in tasks["charges"]))
    status, node, _ = api(base, "api/v1/node", token)
    assert close(total[-1][1], node["spent_rho"])
    # Each researcher's line ends at what they were charged.
    names = sorted({c["researcher"] or "-" for c in tasks["charges"]})
    for n in names:
        line = series(page, "researcher-chart", "researcher:" + n)
        assert close(line[-1][1], sum(c["rho"] for c in tasks["charges"] if (c["researcher"] or "-") == n))
    # Recent tasks name who, what, cost and outcome.
    header = page.inner_text("#tasks-table thead")
    for column in ["researcher", "decision", "ρ"]:
        assert column in header

    # Deny the demo study here, with a reason, then approve it again.
    page.fill(".deny-reason[data-study='demo']", "ethics renewal pending")
    page.click("button.deny[data-study='demo']")
    page.wait_for_function("() => document.querySelector('#studies-table').innerText.includes('denied')")
    status, studies, _ = api(base, "api/v1/studies", token)
    demo = next(s for s in studies["studies"] if s["study"] == "demo")
    assert demo["status"] == "denied" and demo["reason"] == "ethics renewal pending"
    page.click("button.approve[data-study='demo']")
    page.wait_for_function("() => !document.querySelector('#studies-table').innerText.includes('denied')")
    status, studies, _ = api(base, "api/v1/studies", token)
    assert next(s for s in studies["studies"] if s["study"] == "demo")["status"] == "approved"
    # Both decisions are in the audit chain, which still verifies.
    status, node, _ = api(base, "api/v1/node", token)
    assert node["audit"]["intact"]
    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert page.inner_text("#audit-status") == f"✓ {node['audit']['records']}"
    status, tasks, _ = api(base, "api/v1/tasks?limit=2", token)
    assert [t["decision"] for t in tasks["recent"]] == ["approved", "denied"]
    assert all(t["researcher"] == "steward (console)" for t in tasks["recent"])
    # A deny without a reason is refused, saying why.
    status, body, _ = api(base, "api/v1/studies/demo/deny", token, body={"reason": " "})
    assert status == 400 and "reason" in body["error"]
    assert api(base, "api/v1/studies/nope/approve", token, body={})[0] == 404
    page.screenshot(path=str(ARTIFACTS / "steward.png"), full_page=True)
    assert not errors, errors
    ctx.close()
