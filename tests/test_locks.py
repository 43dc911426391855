"""One writer per work directory (`daug_jax.lock`): refused while held, stale locks taken over,
shared by the processes of one job, released on exit and on error; applied by the commands."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from daug_jax import cli
from daug_jax.lock import LOCK_NAME, job_id, workdir_lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid no longer names a process
    return proc.pid


def _write_lock(directory, **fields) -> None:
    os.makedirs(directory, exist_ok=True)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2024-01-01 00:00:00",
              "run": None, "what": "test", **fields}
    (directory / LOCK_NAME).write_text(json.dumps(holder))


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
    assert not (tmp_path / LOCK_NAME).exists()


def test_released_after_the_block_and_after_an_exception(tmp_path):
    with workdir_lock(str(tmp_path / "new")):  # the directory is created
        assert (tmp_path / "new" / LOCK_NAME).exists()
    assert not (tmp_path / "new" / LOCK_NAME).exists()
    with pytest.raises(KeyError):
        with workdir_lock(str(tmp_path)):
            raise KeyError("boom")
    assert not (tmp_path / LOCK_NAME).exists()
    with workdir_lock(str(tmp_path)):  # free again
        pass


@pytest.mark.parametrize("garbage", [False, True])
def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys, garbage):
    if garbage:  # killed between creating the file and writing it
        (tmp_path / LOCK_NAME).write_text("")
    else:
        _write_lock(tmp_path, pid=_dead_pid())
    capsys.readouterr()
    with workdir_lock(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"daug-jax: taking over the lock of {tmp_path}")
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_holder_on_another_host_is_not_second_guessed(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid(), host="elsewhere")
    with pytest.raises(ValueError, match=r"in use by pid \d+ on elsewhere since"):
        with workdir_lock(str(tmp_path)):
            pass


def test_the_processes_of_one_job_share_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("DAUG_COORDINATOR", "127.0.0.1:1234")
    monkeypatch.setenv("DAUG_NUM_PROCESSES", "2")
    assert job_id() == "127.0.0.1:1234/2"
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, pid=sibling.pid, run=job_id())
        with workdir_lock(str(tmp_path)):  # the job's other process holds it: proceed
            pass
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == sibling.pid  # kept
        monkeypatch.setenv("DAUG_COORDINATOR", "127.0.0.1:5678")  # another job
        with pytest.raises(ValueError, match=f"in use by pid {sibling.pid}"):
            with workdir_lock(str(tmp_path)):
                pass
    finally:
        sibling.kill()
        sibling.wait()


@pytest.mark.parametrize("command", ["heatmaps", "data build", "data prepare"])
def test_commands_refuse_a_directory_in_use(tmp_path, capsys, command):
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path / "dir", pid=sibling.pid)
        argv = {"heatmaps": ["heatmaps", "--out", tmp_path / "dir"],
                "data build": ["data", "build", "--data-dir", tmp_path / "dir"],
                "data prepare": ["data", "prepare", "mimic_cxr", "--manual-dir",
                                 tmp_path / "manual", "--data-dir", tmp_path / "dir"]}[command]
        capsys.readouterr()
        assert cli.main([str(a) for a in argv]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.fullmatch(rf"daug-jax {command}: error: .*dir is in use by pid {sibling.pid} "
                            r"on .* since .*; wait for it or use another directory", last), last
    finally:
        sibling.kill()
        sibling.wait()
