"""The one training loop: the epsilon-UNet, the noise-aware classifier and the two towers.

Each model supplies a jitted, pure ``step(state, batch) -> (state, metrics)`` and a stream of
host batches that is a pure function of (seed, step) (`data.pipeline.train_batches`); the loop
owns everything else, the same way for all three:

* the optimizer (`adamw`: global-norm clipping, AdamW, warm-up then constant or cosine rate),
  its update inside every step (`apply_update`) and the non-finite skip (`keep_if_finite`);
* resuming (`resume`): the metadata of the newest checkpoint is compared with this run's
  *before* anything is restored, so a changed architecture is refused with the changed fields
  named instead of failing inside orbax; the restored step's metadata is checked again;
* the loop itself (`fit`): progress bar, metrics fetched from the device only once per logging
  or checkpoint interval (the loop never waits on the accelerator in between), checked finite
  before anything is saved (`check_finite`: a checkpoint never holds a non-finite update),
  written to a JSON-lines log, an orbax checkpoint every ``save_every`` steps and at the end.
  PRNG keys are folded from the step inside the steps, so a run restored from its latest
  checkpoint continues exactly as an uninterrupted one would.

A population of runs (`daug_jax.population`) goes through the same loop: its step returns
metrics with a leading member axis [M] and `Job.members` names the members.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from daug_jax import files
from daug_jax.checkpoint import Checkpointer


# ----------------------------------------------------------------------------- keys
def prng_key(seed: int, impl: str) -> jax.Array:
    """A run's root key: ``seed`` with the PRNG implementation of its config (``prng_impl``)."""
    return jax.random.key(int(seed), impl=impl)


# ----------------------------------------------------------------------------- optimizer
def adamw(*, learning_rate: float, warmup: int, grad_clip: float, weight_decay: float,
          decay_steps: int | None = None, decay_mask: Any = None,
          frozen: Callable | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)``; after the warm-up from 0 a constant rate (``decay_steps`` None: safe
    to extend a run) or a cosine decay to 0 at ``decay_steps``.  decay_mask: pytree (or function
    of the parameters) of where AdamW decays; frozen: parameters -> pytree of bools, True where
    the gradient is zeroed before clipping (neither moving nor taking a share of the norm)."""
    if decay_steps is None:
        schedule = optax.warmup_constant_schedule(0.0, learning_rate, warmup)
    else:
        schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, decay_steps)
    tx = optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(schedule, weight_decay=weight_decay, mask=decay_mask))
    if frozen is not None:
        tx = optax.chain(optax.masked(optax.set_to_zero(), frozen), tx)
    return tx, schedule


def apply_update(tx: optax.GradientTransformation, params: Any, opt_state: Any,
                 grads: Any) -> tuple[Any, Any, jax.Array]:
    """One optimizer update inside a jitted step: ``(params, opt_state, grad_norm)``."""
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)


# ----------------------------------------------------------------------------- non-finite
class NonFiniteError(ValueError):
    """Training produced a non-finite loss or gradient norm."""


def keep_if_finite(loss: jax.Array, grad_norm: jax.Array, new: Any, old: Any) -> tuple[Any, Any]:
    """``(new if loss and grad_norm are finite else old, skipped)`` for any pytrees (jit-safe):
    with a config's ``skip_nonfinite``, a step whose loss or gradient norm is not finite leaves
    the state as it was and reports ``skipped`` = 1; such steps are counted, not fatal."""
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    return kept, 1.0 - ok.astype(jnp.float32)


def check_finite(rows: Sequence[dict], *, name: str, workdir: str, last_saved: int | None) -> int:
    """Raises `NonFiniteError` naming the first step whose loss or grad_norm is not finite
    (steps reported as skipped are counted instead); returns how many were skipped.  rows: one
    dict per step with "step", "loss", "grad_norm" (and "skipped" when skipping)."""
    skipped = 0
    for row in rows:
        if row.get("skipped", 0.0) > 0:
            skipped += 1
        elif not (np.isfinite(row["loss"]) and np.isfinite(row["grad_norm"])):
            kept = (f"the last finite checkpoint (step {last_saved}) is kept in {workdir}"
                    if last_saved else f"no checkpoint was saved in {workdir}")
            raise NonFiniteError(
                f"{name}: non-finite training at step {row['step']} (loss {row['loss']}, "
                f"grad_norm {row['grad_norm']}); {kept}. Lower the learning rate, or set "
                f"skip_nonfinite=True in the train section to skip such steps")
    return skipped


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
    0)``.  compared: meta -> the fields that must match (`check_resume`; default: all of it),
    checked before the restore and again on the restored step (older when the newest was
    damaged)."""
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
    """What a run is called, where and how often it logs and saves, and how far it goes.

    name: what messages (`check_finite`) call the run; ckpt, meta: where it saves and the
    metadata saved with every checkpoint; stop: the step this call ends at (default ``steps``;
    a later call continues from there); members: names of the runs of a population (None: a
    single run); average: one log record per interval (the mean of each metric over the
    interval, ``skipped`` summed, ``sec_per_step``) instead of one per step; postfix: metrics
    shown on the progress bar; saved_view(state) -> the pytree to checkpoint.
    """
    name: str
    workdir: str
    steps: int
    log_every: int
    save_every: int
    log_file: str
    ckpt: Checkpointer
    meta: dict
    stop: int | None = None
    members: Sequence[str] | None = None
    average: bool = False
    postfix: Sequence[str] = ("loss",)
    desc: str | None = None
    progress: bool = True
    saved_view: Callable[[Any], Any] = lambda state: state


class MetricLog:
    """Metric rows read from the device once per interval, checked finite, written to
    ``<workdir>/<log_file>`` whole (temp file, then rename) by process 0.  A population's lines
    name their member (``"member"``); a single run's do not."""

    def __init__(self, job: Job, start: int):
        self.job, self.saved = job, start or None
        self.names = list(job.members) if job.members is not None else [None]
        self.path = os.path.join(job.workdir, job.log_file)
        # Each member's records up to the restored step (later ones are the lost tail).
        self.histories = {name: [] for name in self.names}
        path = pathlib.Path(self.path)
        lines = path.read_text().splitlines() if path.exists() else []
        for record in (json.loads(line) for line in lines if line.strip()):
            name = record.pop("member", None)
            if record["step"] <= start and name in self.histories:
                self.histories[name].append(record)
        self.pending, self.interval, self.tick = [], [], time.time()

    def flush(self, done: int, *, record: bool, bar: Any) -> None:
        """Reads and checks the queued steps' metrics; ``record``: end an interval (log it)."""
        first = done - len(self.pending) + 1
        rows = [[{"step": first + i, **{k: float(np.reshape(v, -1)[m]) for k, v in step.items()}}
                 for m in range(len(self.names))]
                for i, step in enumerate(jax.device_get(self.pending))]
        check_finite([r for step in rows for r in step], name=self.job.name,
                     workdir=self.job.workdir, last_saved=self.saved)
        self.interval, self.pending = self.interval + rows, []
        if record:
            self._record(bar)

    def _record(self, bar: Any) -> None:
        seconds = (time.time() - self.tick) / len(self.interval)
        for m, name in enumerate(self.names):
            rows = [step[m] for step in self.interval]
            if self.job.average:  # the interval's means at its last step, skipped steps summed
                mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
                mean["step"] = rows[-1]["step"]
                if "skipped" in mean:
                    mean["skipped"] = int(sum(r["skipped"] for r in rows))
                rows = [{**mean, "sec_per_step": seconds}]
            self.histories[name] += rows
        lines = [json.dumps(r if name is None else {**r, "member": name}) + "\n"
                 for name, history in self.histories.items() for r in history]
        if jax.process_index() == 0:
            files.write_text(self.path, "".join(lines))
        last = self.histories[self.names[0]][-1]
        bar.set_postfix({k: f"{last[k]:.4f}" for k in self.job.postfix if k in last})
        self.interval, self.tick = [], time.time()


def fit(job: Job, state: Any, step: Callable, batches: Iterator[dict], *, start: int,
        first: dict | None = None) -> tuple[Any, list | dict]:
    """Runs ``step`` from step ``start`` to ``job.stop`` (default ``job.steps``); returns
    (state, history): a list of logged rows, or {member: rows} for a population.

    step(state, host_batch) -> (state, metrics): metrics are device scalars, or [M] for a
    population of M; batches: host batches from step ``start`` on (``first``, when given, is
    the batch of step ``start``, already read to check the input).
    """
    stop = job.steps if job.stop is None else min(int(job.stop), job.steps)
    log, ckpt = MetricLog(job, start), job.ckpt
    lead = jax.process_index() == 0
    t_first = None
    try:
        with tqdm(range(start, stop), initial=start, total=job.steps, desc=job.desc or job.name,
                  unit="step", disable=not (job.progress and lead)) as bar:
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
                    ckpt.save(done, job.saved_view(state), job.meta, force=True)
                    log.saved = done
    finally:
        ckpt.close()  # waits for the saves in flight: a failed run keeps its last checkpoint
    if t_first is not None and stop - start > 1 and lead and job.progress:
        jax.block_until_ready(state)
        per = (time.perf_counter() - t_first) / (stop - start - 1)
        tqdm.write(f"{job.name}: steps {start}->{stop}, {per:.3f} s/step after compilation "
                   f"({jax.device_count()} {jax.default_backend()} device(s))")
    return state, log.histories[None] if job.members is None else log.histories
