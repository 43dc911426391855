"""Launching JAX subprocesses from tests: environment, free ports, bounded runs that are always reaped.

Device counts must be fixed before JAX starts, so multi-device and multi-process checks run in
fresh interpreters.  They share a persistent compilation cache (one directory per test session):
a rerun of the same program, e.g. a resumed training command, then loads its executable instead
of compiling it again.  XLA's backend optimisation is turned off there as well: the tiny models
run in milliseconds and compilation is what costs time; both sides of every comparison run with
the same flags.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
CLI = [PYTHON, "-m", "daug_jax.cli"]


def jax_env(cache_dir: str, devices: int = 1, **extra: str) -> dict:
    """Environment of a CPU JAX subprocess with ``devices`` simulated devices."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DAUG_", "XLA_", "JAX_"))}
    env.update({
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": (f"--xla_force_host_platform_device_count={devices} "
                      "--xla_backend_optimization_level=0"),
        "JAX_COMPILATION_CACHE_DIR": cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", ""),
        "TQDM_MININTERVAL": "0",
    })
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict, log_path: str) -> subprocess.Popen:
    """Starts ``cmd`` in its own process group, stdout and stderr to ``log_path``."""
    log = open(log_path, "w")
    try:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        log.close()  # the child holds its own descriptor


def kill(proc: subprocess.Popen) -> None:
    """SIGKILLs ``proc``'s process group (ours: started with start_new_session) and reaps it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def tail(path: str, chars: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def wait_for_line(proc: subprocess.Popen, log_path: str, text: str, timeout: float) -> None:
    """Waits until ``text`` appears in ``log_path``, the output of ``proc``; fails, with the
    output's tail, if ``proc`` exits first or ``timeout`` seconds pass.  Meant for the lines that
    the library's test pause hooks (``DAUG_TEST_PAUSE_AFTER_*``) print before they block."""
    deadline = time.monotonic() + timeout
    while True:
        exited = proc.poll() is not None  # before reading: a line printed before exiting counts
        with open(log_path, errors="replace") as f:
            if text in f.read():
                return
        if exited:
            raise AssertionError(f"exited ({proc.returncode}) before printing {text!r}:\n"
                                 f"{tail(log_path)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} after {timeout} s:\n{tail(log_path)}")
        time.sleep(0.02)


def run(cmd: list[str], env: dict, log_path: str, timeout: float) -> str:
    """Runs ``cmd`` to completion within ``timeout`` seconds; returns its output, fails loudly."""
    proc = start(cmd, env, log_path)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        raise AssertionError(f"{' '.join(cmd)} did not finish in {timeout} s:\n{tail(log_path)}")
    finally:
        kill(proc)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{tail(log_path)}")
    with open(log_path, errors="replace") as f:
        return f.read()
