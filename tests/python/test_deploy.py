"""The systemd units in deploy/systemd: `systemd-analyze verify` accepts
them as installed (the confer binary at its ExecStart path, the
environment file beside), and `systemd-analyze security` rates their
exposure low. Skipped, saying why, where systemd-analyze is missing."""

import os
import pathlib
import re
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
UNITS = REPO / "deploy" / "systemd"


def installed(tmp_path):
    """The units with their paths pointed at this build and a temp /etc."""
    confer = os.environ.get("CONFER_BIN")
    if not confer or not os.path.exists(confer):
        pytest.fail("set CONFER_BIN to the confer executable (make test does)")
    out = []
    for env in UNITS.glob("*.env"):
        shutil.copy(env, tmp_path / env.name)
    for unit in sorted(UNITS.glob("*.service")):
        text = unit.read_text()
        assert "ExecStart=/usr/local/bin/confer " in text, unit
        text = text.replace("/usr/local/bin/confer", confer).replace("/etc/confer/", f"{tmp_path}/")
        path = tmp_path / unit.name
        path.write_text(text)
        out.append(path)
    assert [p.name for p in out] == ["confer-coordinator.service", "confer-node.service"]
    return out


def test_units_verify_and_are_hardened(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here (Debian package systemd)")
    units = installed(tmp_path)
    done = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True, timeout=60
    )
    # Any warning (an unknown key, a key in the wrong section) fails too.
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr
    for unit in units:
        text = unit.read_text()
        for key in [
            "User=confer",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
            "MemoryMax=",
            "Restart=on-failure",
            "StandardOutput=journal",
        ]:
            assert key in text, (unit.name, key)
        rated = subprocess.run(
            ["systemd-analyze", "security", "--offline=true", str(unit)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", rated.stdout + rated.stderr)
        assert match, rated.stdout + rated.stderr
        exposure = float(match.group(1))
        print(f"{unit.name}: systemd-analyze security exposure {exposure}")
        assert exposure <= 2.0, rated.stdout
