"""Start real Redis, PostgreSQL and S3 (moto) servers on free loopback ports for the tests.

Each `start_*` returns `(url, stop)`; `stop()` is idempotent and also runs at exit. A missing
binary or a server that does not come up raises ServerError (with the server's log): in CI a
missing server is a failure, never a skip.

PostgreSQL refuses to run as root. When the tests run as root (CI containers), initdb and
postgres run as the `postgres` system user (Debian's package creates it) or else `nobody`,
through subprocess's `user=`/`group=` (setuid in the child; no su/runuser needed), in a
temporary folder handed to that user.
"""

from __future__ import annotations

import atexit
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

Stop = Callable[[], None]

START_TIMEOUT = 30.0
_PORT_IN_USE = ("Address already in use", "could not bind", "could not create listen socket")


class ServerError(RuntimeError):
    """A test server could not be started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- Redis -----------------------------------------------------------------------------------


def start_redis(port: int | None = None) -> tuple[str, Stop]:
    """redis-server on `port` (default: a free one), no persistence, `noeviction`; returns
    (redis://..., stop). A fixed port lets a test start a new server where one was killed."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServerError(f"redis-server is not on PATH: apt-get install -y {REDIS_PACKAGE}")
    if port is not None:
        return _start_redis_once(binary, port)
    return _with_port_retries(lambda port: _start_redis_once(binary, port))


def _start_redis_once(binary: str, port: int) -> tuple[str, Stop]:
    workdir = Path(tempfile.mkdtemp(prefix="imagebatch-redis-"))
    log = workdir / "redis.log"
    args = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--maxmemory-policy", "noeviction", "--dir", str(workdir),
        "--daemonize", "no", "--logfile", "",
    ]
    proc = _spawn(args, log)
    url = f"redis://127.0.0.1:{port}/0"
    stop = _stopper(proc, workdir, signal_first="terminate")
    _wait_until("redis-server", proc, log, stop, lambda: _redis_ping(url))
    return url, stop


def _redis_ping(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    finally:
        client.close()


# --- PostgreSQL ------------------------------------------------------------------------------


def start_postgres(settings: dict[str, str] | None = None) -> tuple[str, Stop]:
    """A throwaway PostgreSQL cluster with database `imagebatch`, trust auth, on 127.0.0.1;
    `settings` are extra server settings (`-c name=value`).

    Returns (postgresql+psycopg://postgres@127.0.0.1:PORT/imagebatch, stop).
    """
    bindir = _pg_bindir()
    extra = [arg for name, value in (settings or {}).items() for arg in ("-c", f"{name}={value}")]
    return _with_port_retries(lambda port: _start_postgres_once(bindir, port, extra))


def _pg_bindir() -> Path:
    bindir = pg_bindir()
    if bindir is None:
        raise ServerError(f"the PostgreSQL server (initdb, postgres) is not installed: "
                          f"apt-get install -y {POSTGRES_PACKAGE}")
    return bindir


# Debian's and Ubuntu's package for the PostgreSQL server of the release (15 on Debian 12).
POSTGRES_PACKAGE = "postgresql"
REDIS_PACKAGE = "redis-server"


def pg_bindir() -> Path | None:
    """The folder holding the PostgreSQL server's `initdb` and `postgres`, or None.

    Debian puts them off PATH, in /usr/lib/postgresql/VERSION/bin, and `pg_config` (which names
    that folder) comes with libpq-dev, which the server package does not pull in: so look where
    pg_config says, then in Debian's folders (newest version first), then on PATH."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(Path(out.stdout.strip()))
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                    key=lambda path: _version_key(path.parent.name), reverse=True)
    candidates.extend(debian)
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    for bindir in candidates:
        if all((bindir / name).is_file() for name in ("initdb", "postgres")):
            return bindir
    return None


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def missing_servers() -> list[str]:
    """The Debian packages the integration and acceptance tests need and do not find."""
    missing = [] if shutil.which("redis-server") else [REDIS_PACKAGE]
    return missing if pg_bindir() is not None else [*missing, POSTGRES_PACKAGE]


def _start_postgres_once(bindir: Path, port: int, extra: list[str]) -> tuple[str, Stop]:
    user = _pg_os_user()
    workdir = Path(tempfile.mkdtemp(prefix="imagebatch-pg-", dir=_tmp_base(user)))
    data = workdir / "data"
    log = workdir / "postgres.log"
    if user is not None:
        os.chown(workdir, user.pw_uid, user.pw_gid)
    try:
        _run_as(user, [
            str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
            "--no-locale", "--encoding=UTF8", "--no-sync",
        ], log, workdir)
    except ServerError:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    proc = _spawn([
        str(bindir / "postgres"), "-D", str(data), "-p", str(port),
        "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={workdir}",
        "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
        "-c", "max_connections=300", *extra,
    ], log, user=user)
    stop = _stopper(proc, workdir, signal_first="interrupt")  # SIGINT: fast shutdown
    _wait_until("postgres", proc, log, stop, lambda: _pg_ready(port))
    _pg_create_database(port, "imagebatch")
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/imagebatch", stop


def _pg_os_user() -> pwd.struct_passwd | None:
    """The unprivileged user to run PostgreSQL as when we are root; None when we are not."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ServerError("running as root and neither a 'postgres' nor a 'nobody' user exists")


def _tmp_base(user: pwd.struct_passwd | None) -> str | None:
    """A temp base the PostgreSQL user can reach (root's TMPDIR may be private)."""
    base = tempfile.gettempdir()
    if user is None or _world_traversable(Path(base)):
        return None
    return "/tmp"


def _world_traversable(path: Path) -> bool:
    path = path.resolve()
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in [path, *path.parents])


def _run_as(user: pwd.struct_passwd | None, args: list[str], log: Path, cwd: Path) -> None:
    with log.open("ab") as out:
        try:
            result = subprocess.run(
                args, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, check=False,
                **_user_kwargs(user),  # type: ignore[arg-type]
            )
        except OSError as exc:
            raise ServerError(f"cannot run {args[0]}: {exc}") from exc
    if result.returncode != 0:
        raise ServerError(f"{Path(args[0]).name} failed ({result.returncode}):\n{_tail(log)}")


def _pg_ready(port: int) -> bool:
    import psycopg

    with psycopg.connect(
        host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=2
    ):
        return True


def _pg_create_database(port: int, name: str) -> None:
    import psycopg

    with psycopg.connect(
        host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')


# --- S3 (moto) -------------------------------------------------------------------------------


def start_moto() -> tuple[str, Stop]:
    """moto's S3 in server mode on a loopback port, in a thread; returns (http://..., stop).

    Port 0 lets the OS pick: ThreadedMotoServer.start() would hang forever if its bind
    failed. moto's (werkzeug's) server answers `Expect: 100-continue` at once, so a PUT does
    not stall (tests/integration/test_storage.py checks it).
    """
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise ServerError(
            f"moto server mode is not installed: pip install 'moto[server]' ({exc})"
        ) from exc
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            server.stop()

    atexit.register(stop)
    return f"http://{host}:{port}", stop


# --- processes -------------------------------------------------------------------------------


def _with_port_retries(start: Callable[[int], tuple[str, Stop]]) -> tuple[str, Stop]:
    """Start on a free port; if another process took it meanwhile, try another one."""
    for attempt in range(3):
        try:
            return start(free_port())
        except ServerError as exc:
            if attempt == 2 or not any(text in str(exc) for text in _PORT_IN_USE):
                raise
    raise AssertionError("unreachable")


def _user_kwargs(user: pwd.struct_passwd | None) -> dict[str, object]:
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _spawn(args: list[str], log: Path, user: pwd.struct_passwd | None = None) -> subprocess.Popen:
    with log.open("ab") as out:
        try:
            return subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=log.parent, start_new_session=True, **_user_kwargs(user),  # type: ignore[arg-type]
            )
        except OSError as exc:
            shutil.rmtree(log.parent, ignore_errors=True)
            raise ServerError(f"cannot run {args[0]}: {exc}") from exc


def _stopper(proc: subprocess.Popen, workdir: Path, signal_first: str) -> Stop:
    done = False

    def stop() -> None:
        nonlocal done
        if done:
            return
        done = True
        if proc.poll() is None:
            if signal_first == "interrupt":
                proc.send_signal(2)  # SIGINT
            else:
                proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(workdir, ignore_errors=True)

    atexit.register(stop)
    return stop


def _wait_until(
    name: str, proc: subprocess.Popen, log: Path, stop: Stop, ready: Callable[[], bool]
) -> None:
    """Poll `ready` until it is true; on exit or timeout, stop and raise with the log."""
    deadline = time.monotonic() + START_TIMEOUT
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = _tail(log)
            stop()
            raise ServerError(f"{name} exited with status {proc.returncode}:\n{text}")
        try:
            if ready():
                return
        except Exception as exc:  # not accepting connections yet
            last_error = exc
        time.sleep(0.05)
    text = _tail(log)
    stop()
    raise ServerError(
        f"{name} did not become ready in {START_TIMEOUT:.0f} s ({last_error}):\n{text}"
    )


def _tail(log: Path, limit: int = 4000) -> str:
    try:
        return log.read_text(errors="replace")[-limit:]
    except OSError as exc:
        return f"(no log: {exc})"
