"""`python -m tests [PYTEST ARGS]`: install what the tests need, then run them.

On a fresh Debian or Ubuntu machine, after `pip install -e .`, this one command installs the
`test` extras (only when one is missing, so an existing install is left as it is), installs
`redis-server`, the PostgreSQL server and `chromium` (the browser tests of `imagebatch serve`,
driven by Playwright: never a browser Playwright downloads) through apt when they are missing
and it runs as root (or else names exactly what to install and exits 2), then runs pytest:
by default the whole suite, all three lanes (tests/unit, tests/integration,
tests/acceptance) and the `big` lane. Arguments go to pytest as they are
(`python -m tests -m 'not big'`). A run of tests/unit alone needs no server, so none is
looked for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.util import find_spec

from tests import ROOT
from tests.servers import missing_servers

# What `pip install -e '.[test]'` brings, by the module each package installs: the runtime
# dependencies too, in case `pip install -e .` was not run first.
NEEDED_MODULES = ("pytest", "pytest_timeout", "xdist", "moto", "flask", "httpx", "ruff", "celery",
                  "sqlalchemy", "psycopg", "boto3", "aiohttp", "jinja2", "playwright")
UNIT_LANE = ROOT / "tests" / "unit"


class Missing(Exception):
    """Something the tests need cannot be installed from here; the message says what."""


def main(args: list[str]) -> int:
    try:
        install_test_extras()
        if needs_servers(args):
            install_servers()
    except Missing as missing:
        print(f"python -m tests: {missing}", file=sys.stderr)
        return 2
    try:
        return subprocess.run([sys.executable, "-m", "pytest", "-q", *in_parallel(args), *args],
                              cwd=ROOT).returncode
    except KeyboardInterrupt:
        return 130


def in_parallel(args: list[str]) -> list[str]:
    """The whole suite runs in two processes, a test file each at a time (its server tests
    mostly wait on timers and subprocesses, so two overlap on two cores); a run the
    caller shaped (any arguments) runs as asked."""
    return [] if args else ["-n", "2", "--dist", "loadfile"]


def install_test_extras() -> None:
    if all(find_spec(name) is not None for name in NEEDED_MODULES):
        return
    command = [sys.executable, "-m", "pip", "install", "-q", "-e", f"{ROOT}[test]"]
    print(f"python -m tests: installing the test extras: {' '.join(command)}", flush=True)
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        raise Missing(f"could not install the test extras; run: {' '.join(command)}")


# pytest options whose value is the next argument (that value is not a path to test).
VALUED_OPTIONS = frozenset({
    "-k", "-m", "-p", "-c", "-o", "-W", "-r", "--deselect", "--ignore", "--ignore-glob",
    "--rootdir", "--basetemp", "--confcutdir", "--durations", "--maxfail", "--timeout",
})


# Options with which pytest runs no test.
NO_RUN_OPTIONS = frozenset({"-h", "--help", "--version", "-V", "--collect-only", "--co",
                            "--markers", "--fixtures"})


def needs_servers(args: list[str]) -> bool:
    """False when every path asked for lies in the unit lane (which reaches no server), or
    when pytest is asked for no test run at all."""
    if NO_RUN_OPTIONS.intersection(args):
        return False
    paths = [arg for arg, before in zip(args, ["", *args][:len(args)], strict=True)
             if not arg.startswith("-") and before not in VALUED_OPTIONS and _is_test_path(arg)]
    return not paths or not all(_in_unit_lane(path) for path in paths)


def _is_test_path(arg: str) -> bool:
    return (ROOT / arg.split("::")[0]).exists()


def _in_unit_lane(arg: str) -> bool:
    path = (ROOT / arg.split("::")[0]).resolve()
    return path == UNIT_LANE or UNIT_LANE in path.parents


# The browser tests (tests/acceptance/test_serve.py) launch Debian's chromium.
BROWSER_PACKAGE = "chromium"


def missing_packages() -> list[str]:
    """The Debian packages the integration and acceptance lanes need and do not find."""
    browser = [] if shutil.which(BROWSER_PACKAGE) else [BROWSER_PACKAGE]
    return [*missing_servers(), *browser]


def install_servers() -> None:
    packages = missing_packages()
    if not packages:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Missing(f"missing {' and '.join(packages)} (the integration and acceptance "
                      "tests start their own servers and a browser): install as root with "
                      f"`apt-get install -y {' '.join(packages)}` and run this again; the unit "
                      "lane needs no server: python -m pytest -q tests/unit")
    print(f"python -m tests: installing {' '.join(packages)} with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    if subprocess.run(install, env=env).returncode != 0:
        # A fresh image has no package lists yet.
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False)
        subprocess.run(install, env=env, check=False)
    still = missing_packages()
    if still:
        raise Missing(f"apt-get did not install {' and '.join(still)}: install it with "
                      f"`apt-get install -y {' '.join(still)}` and run this again")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
