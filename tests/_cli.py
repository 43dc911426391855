"""Running ``daug-jax`` commands in-process from tests."""

import re

from daug_jax import cli


def ok(*argv):
    """The command succeeds (exit status 0)."""
    assert cli.main([str(a) for a in argv]) == 0


def user_error(capsys, pattern, *argv):
    """The command fails with status 2 and one line ``daug-jax <command>: error: ...``."""
    capsys.readouterr()
    assert cli.main([str(a) for a in argv]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(r"daug-jax [a-z -]+: error: ", last) and re.search(pattern, last), last
