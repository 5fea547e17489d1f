"""A running confer federation for the Python client tests.

Starts `confer demo --serve` (three GiBleed nodes and a coordinator on
loopback), reads the coordinator address and the researcher's token from its
output, and stops it with Ctrl-C (SIGINT) after the session.
"""

import os
import re
import signal
import subprocess
import time

import pytest


def _confer_bin():
    path = os.environ.get("CONFER_BIN")
    if not path or not os.path.exists(path):
        pytest.fail("set CONFER_BIN to the confer executable (make test does)")
    return path


@pytest.fixture(scope="session")
def federation(tmp_path_factory):
    work = tmp_path_factory.mktemp("federation")
    proc = subprocess.Popen(
        # One month before last month too: the console's trend lines.
        [_confer_bin(), "demo", "--serve", "--trend-months", "1", "--work-dir", str(work / "demo")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = []
    deadline = time.time() + 300
    info = {}
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        out.append(line)
        if m := re.search(r"Coordinator: http://([0-9.]+:[0-9]+)", line):
            info["addr"] = m.group(1)
        if m := re.search(r"export CONFER_TOKEN=(\S+)", line):
            info["token"] = m.group(1)
        if m := re.search(r"Admin token \(user `admin`\): (\S+)", line):
            info["admin_token"] = m.group(1)
        if m := re.search(r"Commission coordinator \(.*\): http://([0-9.]+:[0-9]+)", line):
            info["commission_addr"] = m.group(1)
        if m := re.search(r"Commission token \(user `admin`\): (\S+)", line):
            info["commission_token"] = m.group(1)
        if m := re.search(r"Web console \(.*\): (http://\S+/)", line):
            info["console"] = m.group(1)
        if m := re.search(r"Commission dashboard \(web console\): (http://\S+/)commission", line):
            info["commission_console"] = m.group(1)
        if m := re.search(r"Analyst token \(user `commission`\): (\S+)", line):
            info["analyst_token"] = m.group(1)
        if m := re.search(r"Steward page of (\S+): (http://\S+/)steward \(steward token: (\S+)\)", line):
            info.setdefault("stewards", {})[m.group(1)] = (m.group(2), m.group(3))
        if "Press Ctrl-C to stop." in line:
            break
    if proc.poll() is not None or {"addr", "token", "admin_token"} - info.keys():
        proc.kill()
        pytest.fail("confer demo --serve did not come up:\n" + "".join(out))
    info["study"] = "demo"
    info["user"] = "researcher"
    yield info
    proc.send_signal(signal.SIGINT)
    try:
        rest, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("confer demo did not stop on Ctrl-C")
    assert proc.returncode == 0, "".join(out) + rest
    assert "federation stopped cleanly" in rest
