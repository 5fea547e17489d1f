#!/usr/bin/env bash
# Installs what confer needs beside the Rust toolchain, idempotently:
#   * .venv: Python 3.11 with the pinned tools of deploy/requirements.txt,
#     among them torch==2.13.0, whose libtorch the tch crate links against.
#   * build/data/synthea27nj: the Synthea27Nj OMOP CDM 5.4 CSVs, unzipped
#     from ../shared/data (examples/datasets/synthea27nj.toml serves them).
#   * the Python client `confer` (python/), installed into .venv in
#     editable mode; skipped (no network needed) when .venv already
#     imports it from this checkout.
# Quiet when everything is already in place. Called by every make target.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
req="$root/deploy/requirements.txt"
stamp="$venv/.confer-requirements.sha256"

say() { printf 'bootstrap: %s\n' "$*" >&2; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

for tool in cargo rustc; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found: install the Rust toolchain (https://rustup.rs)"
done
for component in "cargo fmt" "cargo clippy"; do
    $component --version >/dev/null 2>&1 || die "'$component' is missing: run 'rustup component add rustfmt clippy'"
done

python=""
for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null; then
        python="$candidate"
        break
    fi
done
[ -n "$python" ] || die "Python 3.11 not found (torch 2.13 wheels for tch need it): install python3.11"

# Synthea27Nj ships zipped; unzip it once into build/ (the zip's __MACOSX
# resource forks are left out).
synthea_zip="$root/../shared/data/eunomia_synthea27nj/Synthea27Nj_5.4.zip"
synthea_dir="$root/build/data/synthea27nj"
if [ -f "$synthea_zip" ] && [ ! -f "$synthea_dir/.complete" ]; then
    say "unzipping Synthea27Nj into $synthea_dir"
    rm -rf "$synthea_dir"
    mkdir -p "$synthea_dir"
    "$python" - "$synthea_zip" "$synthea_dir" <<'PY'
import os, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(src) as z:
    for info in z.infolist():
        name = info.filename
        if name.startswith("__MACOSX/") or name.endswith("/"):
            continue
        with z.open(info) as f, open(os.path.join(dst, os.path.basename(name)), "wb") as out:
            out.write(f.read())
PY
    touch "$synthea_dir/.complete"
fi

want="$(sha256sum "$req" | cut -d' ' -f1)"
if ! { [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; }; then
    if [ ! -x "$venv/bin/python" ]; then
        say "creating $venv with $($python --version)"
        "$python" -m venv "$venv"
    fi
    say "installing Python requirements (torch 2.13.0 for libtorch, pyarrow, ADBC, polars, pytest); this takes a few minutes the first time"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir -r "$req"
    "$venv/bin/python" -c 'import torch; assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__' \
        || die "torch in $venv is not 2.13.0; delete $venv and run again"
    echo "$want" > "$stamp"
    say "Python environment ready"
fi

# The web console's chart library (ECharts), from console/package-lock.json
# with `npm ci`: the console crate embeds it at build time, so nothing is
# fetched when a console is served. Again only when the lock file changed.
console_dir="$root/console"
console_stamp="$console_dir/node_modules/.confer-lock.sha256"
if [ -f "$console_dir/package-lock.json" ]; then
    want_lock="$(sha256sum "$console_dir/package-lock.json" | cut -d' ' -f1)"
    if ! { [ -f "$console_stamp" ] && [ "$(cat "$console_stamp")" = "$want_lock" ]; }; then
        command -v npm >/dev/null 2>&1 \
            || die "npm not found: the web console embeds ECharts from console/package-lock.json; install Node.js and npm (Debian: apt-get install nodejs npm)"
        say "installing the console's npm packages (console/package-lock.json)"
        (cd "$console_dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null) \
            || die "npm ci in $console_dir failed"
        echo "$want_lock" > "$console_stamp"
    fi
fi

# Browser tests (tests/python/test_console.py) drive Debian's Chromium
# through Playwright; Playwright's own browser download is never used.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        say "installing Debian's chromium for the browser tests"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
            || { apt-get update >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; } \
            || die "cannot install chromium with apt-get (the browser tests need /usr/bin/chromium)"
    else
        say "warning: chromium is not installed and cannot be installed here (not root, or no apt-get): the browser tests will fail; install Debian's chromium"
    fi
fi

# The Python client, editable: python/src is imported in place, so edits
# need no reinstall. Its dependencies are among the requirements above.
# Nothing to do (and no network needed) when .venv imports it from here.
if ! "$venv/bin/python" - "$root/python/src" <<'PY' 2>/dev/null
import pathlib, sys
import confer
here = pathlib.Path(sys.argv[1]).resolve()
sys.exit(0 if pathlib.Path(confer.__file__).resolve().is_relative_to(here) else 1)
PY
then
    say "installing the Python client (python/) into $venv, editable"
    # With the venv's own setuptools first (no network); if it is too old
    # for python/pyproject.toml, with an isolated build that fetches one.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
        --no-build-isolation -e "$root/python" >/dev/null 2>&1 \
        || "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$root/python" \
        || die "cannot install python/ into $venv (pip install -e python failed)"
fi
