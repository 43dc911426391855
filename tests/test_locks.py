"""One writer per work directory (`daug_jax.lock`): refused while held, free at once when the
holder is killed, shared by the processes of one job, released on exit and on error; applied by
the commands."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from daug_jax import cli
from daug_jax.lock import LOCK_NAME, job_id, workdir_lock

# Another process holding the lock as `workdir_lock` does: flock, then its JSON; "held" once done.
_HOLD = """
import fcntl, json, os, socket, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                    "started": "2024-01-01 00:00:00", "run": sys.argv[2] or None, "what": "test"}))
f.flush()
print("held", flush=True)
time.sleep(60)
"""


@contextlib.contextmanager
def _holder(directory, run: str | None = None):
    """A subprocess holding ``directory``'s lock for the ``with`` block, then killed."""
    os.makedirs(directory, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(directory / LOCK_NAME), run or ""],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in ("DAUG_COORDINATOR", "DAUG_NUM_PROCESSES", "DAUG_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)


def test_second_acquisition_while_held_names_the_holder(tmp_path):
    with workdir_lock(str(tmp_path), what="heatmaps"):
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["what"] == "heatmaps"
        with pytest.raises(ValueError) as err:
            with workdir_lock(str(tmp_path)):
                pass
    assert str(err.value) == (f"{tmp_path} is in use by pid {os.getpid()} on "
                              f"{socket.gethostname()} since {holder['started']}; wait for it or "
                              f"use another directory")
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released: no holder


def test_released_after_the_block_and_after_an_exception(tmp_path):
    with workdir_lock(str(tmp_path / "new")):  # the directory is created
        assert json.loads((tmp_path / "new" / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert (tmp_path / "new" / LOCK_NAME).read_text() == ""
    with pytest.raises(KeyError):
        with workdir_lock(str(tmp_path)):
            raise KeyError("boom")
    assert (tmp_path / LOCK_NAME).read_text() == ""
    with workdir_lock(str(tmp_path)):  # free again
        pass


def test_a_lock_whose_holder_was_killed_is_free_at_once(tmp_path, capfd):
    with _holder(tmp_path) as proc:
        with pytest.raises(ValueError, match=f"in use by pid {proc.pid} on "):
            with workdir_lock(str(tmp_path)):
                pass
    # SIGKILLed (by `_holder`): its JSON is still in the file, but the kernel dropped its flock.
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid
    capfd.readouterr()
    with workdir_lock(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert capfd.readouterr() == ("", "")  # no message


def test_the_processes_of_one_job_share_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("DAUG_COORDINATOR", "127.0.0.1:1234")
    monkeypatch.setenv("DAUG_NUM_PROCESSES", "2")
    assert job_id() == "127.0.0.1:1234/2"
    with _holder(tmp_path, run=job_id()) as sibling:
        with workdir_lock(str(tmp_path)):  # the job's other process holds it: proceed
            pass
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == sibling.pid  # kept
        monkeypatch.setenv("DAUG_COORDINATOR", "127.0.0.1:5678")  # another job
        with pytest.raises(ValueError, match=f"in use by pid {sibling.pid}"):
            with workdir_lock(str(tmp_path)):
                pass


@pytest.mark.parametrize("command", ["heatmaps", "data build", "data prepare"])
def test_commands_refuse_a_directory_in_use(tmp_path, capsys, command):
    with _holder(tmp_path / "dir") as sibling:
        argv = {"heatmaps": ["heatmaps", "--out", tmp_path / "dir"],
                "data build": ["data", "build", "--data-dir", tmp_path / "dir"],
                "data prepare": ["data", "prepare", "mimic_cxr", "--manual-dir",
                                 tmp_path / "manual", "--data-dir", tmp_path / "dir"]}[command]
        capsys.readouterr()
        assert cli.main([str(a) for a in argv]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.fullmatch(rf"daug-jax {command}: error: .*dir is in use by pid {sibling.pid} "
                            r"on .* since .*; wait for it or use another directory", last), last
