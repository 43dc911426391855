"""The one training loop: the epsilon-UNet, the noise-aware classifier and the two towers.

Each model supplies a jitted, pure ``step(state, batch) -> (state, metrics)`` and a stream of
host batches that is a pure function of (seed, step) (`data.pipeline.train_batches`); the loop
owns everything else, the same way for all three:

* the optimizer (`adamw`: global-norm clipping, AdamW, warm-up then constant or cosine rate)
  and its update inside every step (`apply_update`: optional projection, EMA or BatchNorm
  statistics that follow the parameters, the non-finite skip);
* resuming (`resume`): the metadata of the newest checkpoint is compared with this run's
  *before* anything is restored, so a changed architecture is refused with the changed fields
  named instead of failing inside orbax; the restored step's metadata is checked again;
* the loop itself (`fit`): progress bar, metrics fetched from the device only once per logging
  or checkpoint interval (the loop never waits on the accelerator in between), checked finite
  before anything is saved (`guard.check_finite`: a checkpoint never holds a non-finite
  update), written to a JSON-lines log, an orbax checkpoint every ``save_every`` steps and at
  the end.  PRNG keys are folded from the step inside the steps, so a run restored from its
  latest checkpoint continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
import optax
from tqdm import tqdm

from daug_jax import files
from daug_jax.checkpoint import Checkpointer
from daug_jax.guard import check_finite, keep_if_finite


# ----------------------------------------------------------------------------- optimizer
def adamw(*, learning_rate: float, warmup: int, grad_clip: float, weight_decay: float,
          decay_steps: int | None = None, decay_mask: Any = None,
          frozen: Callable | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)``: AdamW after global-norm clipping, linear warm-up from 0 over ``warmup``
    steps, then a constant rate (``decay_steps`` None: safe to extend a run) or a cosine decay
    to 0 at ``decay_steps``.  decay_mask: pytree (or function of the parameters) of where AdamW
    decays; frozen: function of the parameters -> pytree of bools, True where the gradient is
    zeroed before clipping (those parameters neither move nor take a share of the norm)."""
    if decay_steps is None:
        schedule = optax.warmup_constant_schedule(0.0, learning_rate, warmup)
    else:
        schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, decay_steps)
    tx = optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(schedule, weight_decay=weight_decay, mask=decay_mask))
    if frozen is not None:
        tx = optax.chain(optax.masked(optax.set_to_zero(), frozen), tx)
    return tx, schedule


def apply_update(tx: optax.GradientTransformation, params: Any, opt_state: Any, grads: Any,
                 loss: jax.Array, *, skip_nonfinite: bool = False, project: Callable | None = None,
                 follow: tuple[Callable, Any] | None = None) -> tuple[Any, Any, Any, dict]:
    """One optimizer update inside a jitted step: ``(params, opt_state, followed, metrics)``.

    project(params) -> params: applied after the update (e.g. the CLIP scale's clamp);
    follow: (fn(new params) -> pytree, its old value): state that moves with the parameters
    (EMA weights, BatchNorm statistics) — kept or rolled back with them; metrics: ``grad_norm``
    and, with ``skip_nonfinite``, ``skipped`` (1.0 when a non-finite loss or gradient norm left
    everything as it was, `guard.keep_if_finite`).
    """
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    if project is not None:
        new_params = project(new_params)
    fn, old = follow if follow is not None else (lambda p: (), ())
    followed = fn(new_params)
    metrics = {"grad_norm": optax.tree.norm(grads)}
    if skip_nonfinite:
        (new_params, new_opt, followed), metrics["skipped"] = keep_if_finite(
            loss, metrics["grad_norm"], (new_params, new_opt, followed), (params, opt_state, old))
    return new_params, new_opt, followed, metrics


# ----------------------------------------------------------------------------- resume
def check_resume(saved: Mapping[str, Any], fields: Mapping[str, Any], workdir: str) -> None:
    """Raises if ``saved`` (the compared fields of a checkpoint's run) differs from ``fields``
    (this run's), naming every changed field; fields the checkpoint lacks are not compared."""
    diff = [f"{k}: {saved[k]!r} -> {v!r}" for k, v in fields.items()
            if k in saved and files.as_json(saved[k]) != files.as_json(v)]
    if diff:
        raise ValueError(f"{workdir}: the checkpoint was trained with another configuration "
                         f"({'; '.join(diff)}); use another --workdir")


def resume(ckpt: Checkpointer, template: Any, meta: dict, workdir: str,
           compared: Callable[[dict], dict] = lambda meta: meta) -> tuple[Any, int]:
    """``(state, step)`` to continue from: the newest checkpoint that reads, or ``(template,
    0)``.  compared: meta -> the fields that must match between the checkpoint and this run
    (`check_resume`; default: all of the metadata), checked on the newest checkpoint's
    metadata before anything is restored, and on the restored step's (an older one when the
    newest was damaged)."""
    newest = ckpt.latest_meta()
    if newest is not None:
        check_resume(compared(newest), compared(meta), workdir)
    state, saved, start = ckpt.restore_or(template)
    if start:
        check_resume(compared(saved), compared(meta), workdir)
    return state, start


# ----------------------------------------------------------------------------- the loop
@dataclasses.dataclass
class Job:
    """What a run is called and where and how often it logs and saves.

    name: what messages (`guard.check_finite`) call the run; desc: the progress bar's label
    (default: the name); members: names of the runs trained together (a population; one name for a single run);
    average: one log record per interval and member (the mean of each metric over the interval,
    ``skipped`` summed, ``sec_per_step``) instead of one per step; postfix: metrics shown on the
    progress bar.
    """
    name: str
    workdir: str
    steps: int
    log_every: int
    save_every: int
    log_file: str
    members: Sequence[str] = ("run",)
    average: bool = False
    postfix: Sequence[str] = ("loss",)
    desc: str | None = None


class MetricLog:
    """Per-member metric rows: read from the device once per interval, checked finite, written
    to ``<workdir>/<log_file>`` whole (temp file, then rename) by process 0.  Lines of a
    population name their member; a single run's do not."""

    def __init__(self, job: Job, start: int):
        self.job, self.saved = job, start or None
        self.path = os.path.join(job.workdir, job.log_file)
        self.histories = self._read(start)
        self.pending, self.interval, self.tick = [], [], time.time()

    def _read(self, upto: int) -> dict[str, list]:
        """Each member's records up to the restored step (later ones are the lost tail)."""
        histories = {name: [] for name in self.job.members}
        for record in _read_lines(self.path):
            name = record.pop("member", self.job.members[0])
            if record["step"] <= upto and name in histories:
                histories[name].append(record)
        return histories

    def flush(self, done: int, *, record: bool, bar: Any) -> None:
        """Reads and checks the queued steps' metrics; ``record``: end an interval (log it)."""
        first = done - len(self.pending) + 1
        rows = [[{"step": first + i, **{k: float(np.reshape(v, -1)[m]) for k, v in step.items()}}
                 for m in range(len(self.job.members))]
                for i, step in enumerate(jax.device_get(self.pending))]
        check_finite([r for step in rows for r in step], name=self.job.name,
                     workdir=self.job.workdir, last_saved=self.saved)
        self.interval, self.pending = self.interval + rows, []
        if record:
            self._record(done, bar)

    def _record(self, done: int, bar: Any) -> None:
        seconds = (time.time() - self.tick) / len(self.interval)
        for m, name in enumerate(self.job.members):
            rows = [step[m] for step in self.interval]
            self.histories[name] += [_mean(rows, done, seconds)] if self.job.average else rows
        single = len(self.job.members) == 1
        lines = [json.dumps(r if single else {**r, "member": name}) + "\n"
                 for name, history in self.histories.items() for r in history]
        if jax.process_index() == 0:
            files.write_text(self.path, "".join(lines))
        last = self.histories[self.job.members[0]][-1]
        bar.set_postfix({k: f"{last[k]:.4f}" for k in self.job.postfix if k in last})
        self.interval, self.tick = [], time.time()


def _mean(rows: list[dict], done: int, seconds: float) -> dict:
    record = {"step": done, **{k: float(np.mean([r[k] for r in rows]))
                               for k in rows[0] if k != "step"}}
    if "skipped" in record:
        record["skipped"] = int(sum(r["skipped"] for r in rows))
    record["sec_per_step"] = seconds
    return record


def _read_lines(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def fit(job: Job, state: Any, step: Callable, batches: Iterator[dict], *, start: int,
        stop: int | None = None, ckpt: Checkpointer, meta: dict, first: dict | None = None,
        saved_view: Callable = lambda s: s, progress: bool = True) -> tuple[Any, dict]:
    """Runs ``step`` from step ``start`` to ``stop`` (default ``job.steps``); returns (state,
    {member: history}).

    step(state, host_batch) -> (state, metrics): metrics are device scalars, or [M] for a
    population of M; batches: host batches from step ``start`` on (``first``, when given, is
    the batch of step ``start``, already read to check the input); saved_view(state) -> the
    pytree to checkpoint (with ``meta``).
    """
    stop = job.steps if stop is None else min(int(stop), job.steps)
    log = MetricLog(job, start)
    lead = jax.process_index() == 0
    t_first = None
    try:
        with tqdm(range(start, stop), initial=start, total=job.steps, desc=job.desc or job.name,
                  unit="step", disable=not (progress and lead)) as bar:
            for i in bar:
                host = first if (i == start and first is not None) else next(batches)
                state, metrics = step(state, host)
                log.pending.append(metrics)
                if i == start:
                    jax.block_until_ready(metrics)   # the first step includes compilation
                    t_first = time.perf_counter()
                done = i + 1
                logs = done % job.log_every == 0 or done == stop
                saves = done % job.save_every == 0 or done == stop
                if not (logs or saves):
                    continue
                log.flush(done, record=logs, bar=bar)   # checked before anything is saved
                if saves and ckpt.latest_step() != done:
                    ckpt.save(done, saved_view(state), meta, force=True)
                    log.saved = done
    finally:
        ckpt.close()  # waits for the saves in flight: a failed run keeps its last checkpoint
    if t_first is not None and stop - start > 1 and lead and progress:
        jax.block_until_ready(state)
        per = (time.perf_counter() - t_first) / (stop - start - 1)
        tqdm.write(f"{job.name}: steps {start}->{stop}, {per:.3f} s/step after compilation "
                   f"({jax.device_count()} {jax.default_backend()} device(s))")
    return state, log.histories
