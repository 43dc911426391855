"""Damaged checkpoints (array files truncated, as after a full disk): restoring falls back to the
newest older step that reads, with exactly one line of warning; none reading is a clear error."""

from __future__ import annotations

import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import _tiny
from daug_jax import cli
from daug_jax.checkpoint import Checkpointer

SIZE = 32
MODELS = _tiny.diffusion(steps=4, save_every=2) + [
    f"data.image_size={SIZE}", "data.num_train=32", "data.num_validation=8", "data.num_test=8"]


def _state(step: int) -> dict:
    return {"w": jnp.full((16, 8), float(step)), "b": jnp.arange(8, dtype=jnp.int32) * step}


def _save_three(directory) -> None:
    ckpt = Checkpointer(str(directory), save_every=1, keep=3)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), {"step": step})
    ckpt.close()


def damage(directory, step: int) -> None:
    """Truncates the array data files of ``<directory>/<step>/state/`` (orbax's OCDBT stores
    them under ``d/`` folders) to half their size; the metadata stays readable."""
    root = os.path.join(str(directory), str(step), "state")
    files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names
             if os.path.basename(d) == "d"]
    assert files, root
    for path in files:
        os.truncate(path, os.path.getsize(path) // 2)


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_restore_falls_back_to_the_newest_readable_step(tmp_path, capsys):
    _save_three(tmp_path / "ck")
    damage(tmp_path / "ck", 3)
    capsys.readouterr()
    ckpt = Checkpointer(str(tmp_path / "ck"), save_every=1, keep=3)
    state, meta = ckpt.restore(_state(0))
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert re.fullmatch(r"daug-jax: warning: checkpoint 3 in .*ck is damaged \(.+\); "
                        r"using checkpoint 2", lines[0]), lines[0]
    assert ckpt.restored_step == 2 and meta == {"step": 2}
    np.testing.assert_array_equal(state["w"], _state(2)["w"])
    np.testing.assert_array_equal(state["b"], _state(2)["b"])
    # An explicit request for the damaged step falls back the same way.
    ckpt.restore(_state(0))
    assert ckpt.restored_step == 2
    ckpt.restore(_state(0), step=3)
    assert ckpt.restored_step == 2 and len(_warnings(capsys.readouterr().err)) == 2
    ckpt.close()


def test_resume_sets_damaged_steps_aside_and_saves_them_again(tmp_path, capsys):
    _save_three(tmp_path / "ck")
    damage(tmp_path / "ck", 3)
    damage(tmp_path / "ck", 2)
    capsys.readouterr()
    ckpt = Checkpointer(str(tmp_path / "ck"), save_every=1, keep=3)
    state, meta, step = ckpt.restore_or(_state(0))
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 1 and step == 1 and meta == {"step": 1}, lines
    assert "checkpoints 3, 2 in" in lines[0] and "using checkpoint 1" in lines[0]
    assert "3.damaged" in lines[0] and "2.damaged" in lines[0]
    np.testing.assert_array_equal(state["w"], _state(1)["w"])
    # The resumed run sees step 1 as its latest and can write steps 2 and 3 again.
    assert ckpt.latest_step() == 1
    assert ckpt.save(2, _state(2), {"step": 2}, force=True)
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "ck")) == ["1", "2", "2.damaged", "3.damaged"]
    again = Checkpointer(str(tmp_path / "ck"), save_every=1, keep=3)
    assert again.restore_or(_state(0))[2] == 2 and not capsys.readouterr().err.strip()
    again.close()


def test_no_readable_checkpoint_is_a_file_not_found_error(tmp_path, capsys):
    _save_three(tmp_path / "ck")
    for step in (1, 2, 3):
        damage(tmp_path / "ck", step)
    ckpt = Checkpointer(str(tmp_path / "ck"), save_every=1, keep=3)
    for call in (ckpt.restore, ckpt.restore_or):
        with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*ck restores "
                                                    r"\(tried 3, 2, 1; 3: .+\)"):
            call(_state(0))
    assert sorted(os.listdir(tmp_path / "ck")) == ["1", "2", "3"]  # nothing set aside
    ckpt.close()
    assert "Traceback" not in capsys.readouterr().err


def test_heatmaps_load_and_training_resumes_past_a_damaged_checkpoint(tmp_path, capfd):
    """After ``train-diffusion`` checkpointed steps 2 and 4 and step 4's array files were
    truncated: what ``daug-jax heatmaps`` calls loads the models from step 2, warning once, and
    the training command rerun resumes from step 2."""
    from daug_jax.heatmaps import load_models

    sets = _tiny.sets(MODELS)
    for command in ("train-diffusion", "train-classifier"):
        workdir = tmp_path / command.split("-")[1]
        assert cli.main([command, "--workdir", str(workdir), "--data-dir",
                         str(tmp_path / "tfds"), *sets]) == 0
    checkpoints = tmp_path / "diffusion" / "checkpoints"
    assert sorted(n for n in os.listdir(checkpoints) if n.isdigit()) == ["2", "4"]
    shutil.copytree(checkpoints / "4", tmp_path / "intact-4")
    damage(checkpoints, 4)
    capfd.readouterr()
    models = load_models(str(tmp_path / "diffusion"), str(tmp_path / "classifier"))
    captured = capfd.readouterr()
    lines = _warnings(captured.err) + _warnings(captured.out)
    assert len(lines) == 1, lines
    assert re.fullmatch(r"daug-jax: warning: checkpoint 4 in .*diffusion/checkpoints is damaged "
                        r"\(.+\); using checkpoint 2", lines[0]), lines[0]
    assert models.image_shape == (SIZE, SIZE, 1)
    assert sorted(os.listdir(checkpoints)) == ["2", "4"]  # loading only reads

    # Rerunning the training command resumes from step 2, sets step 4 aside and trains it again,
    # to the same bits as the uninterrupted run.
    assert cli.main(["train-diffusion", "--workdir", str(tmp_path / "diffusion"), "--data-dir",
                     str(tmp_path / "tfds"), *sets]) == 0
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "warning" in ln]
    assert len(lines) == 1 and "using checkpoint 2; moved aside to 4.damaged" in lines[0], lines
    assert sorted(os.listdir(checkpoints)) == ["2", "4", "4.damaged"]
    again = _as_numpy(checkpoints / "4" / "state")
    intact = _as_numpy(tmp_path / "intact-4" / "state")
    assert again.keys() == intact.keys()
    for key in intact:
        np.testing.assert_array_equal(again[key], intact[key], err_msg=key)


def _as_numpy(path) -> dict:
    """{leaf path: numpy array} of an orbax pytree item (the ``state`` of one step)."""
    reader = ocp.PyTreeCheckpointer()
    tree = reader.metadata(str(path)).item_metadata
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), dict(tree),
                            is_leaf=lambda x: not isinstance(x, (dict, list, tuple)))
    state = reader.restore(str(path), restore_args=as_numpy)
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}
