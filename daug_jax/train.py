"""``daug-jax train``: the two towers with the Image-Text-Class hybrid loss, on a data mesh.

    daug-jax train --config towers --workdir runs/towers [--set train.steps=100 ...]

One jitted, pure ``train_step(state, batch) -> (state, metrics)``: parameters replicated, the batch
split over the mesh's "data" axis, the state donated.  Batches are a pure function of (seed, step)
and PRNG keys are folded from the step, so a run killed and restarted with the same command
resumes from its latest checkpoint and ends with the parameters of an uninterrupted run.

Input (`train_towers`): a random-access split of any registered dataset (`data.registry`),
streamed through `data.pipeline` — image [H, W, 1], labels [C] in {-1, 0, 1} (+ missing), report,
id per record — and, for DAug towers, the heatmap dataset of that split joined by index and id.
The encoder input is the image plus ``in_channels - 1`` extra channels, filled per
``model.vision.fill``: "repeat" (the image again: the baseline) or "heatmaps".  The loss is
``w · L_image-text + (1 − w) · L_image-class`` with w = ``train.clip_weight``; with w = 0 the
towers train on class labels alone and need no reports (CheXpert, NIH).

Workdir: checkpoints/ (orbax), tokenizer/ (trained from scratch), config.json, metrics.jsonl
(one line per logging interval: the mean of each metric over the interval).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from daug_jax import files, parallel, population
from daug_jax.checkpoint import Checkpointer
from daug_jax.guard import check_finite, keep_if_finite
from daug_jax.data import synthetic
from daug_jax.data.pipeline import train_batches
from daug_jax.losses import hybrid_contrastive_loss
from daug_jax.models import text as text_lib
from daug_jax.models.two_tower import (  # noqa: F401  (assemble_images, bert_config: re-exported)
    TwoTower, assemble_images, bert_config, build_two_tower, clamp_logit_scale, class_prompts)
from daug_jax.tower_inputs import (class_names_of, make_reader, make_tokenizer, open_heatmaps,
                                   report_corpus, tower_batch, uses_reports)



@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; checkpointed whole, replicated on the mesh."""
    step: jax.Array   # [] int32: completed steps
    params: Any
    batch_stats: Any  # BatchNorm running averages; {} with GroupNorm
    opt_state: Any


# ----------------------------------------------------------------------------- state and step
def weight_decay_mask(params: Any) -> Any:
    """True where AdamW decays: matrices and embeddings (ndim > 1).  Decaying norm scales, biases
    or the temperature would pull them towards 0, which is not a simpler model; Flax keeps
    biases and LayerNorm parameters 1-D, so none of them is decayed (the authors' rule too)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(train_config: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup and cosine decay over ``train.steps``; global-norm clipping; the
    CLIP temperature learned unless ``train.learn_logit_scale`` is False."""
    steps = int(train_config.steps)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, train_config.lr, int(train_config.warmup), max(steps, int(train_config.warmup) + 1))
    tx = optax.chain(optax.clip_by_global_norm(train_config.get("grad_clip", 1.0)),
                     optax.adamw(schedule, weight_decay=train_config.weight_decay,
                                 mask=weight_decay_mask))
    if not train_config.get("learn_logit_scale", True):
        # The authors hold the CLIP temperature fixed (exp 4.602 ~ 100): its gradient is zeroed
        # before clipping, so it neither moves nor takes a share of the clipped norm.
        fixed = lambda params: {k: jax.tree.map(lambda _: k == "log_logit_scale", v)  # noqa: E731
                                for k, v in params.items()}
        tx = optax.chain(optax.masked(optax.set_to_zero(), fixed), tx)
    return tx, schedule


def create_state(model: TwoTower, tx: optax.GradientTransformation, key: jax.Array,
                 example: dict, class_tokens: tuple, config: Any, mesh: Any) -> TrainState:
    """Fresh parameters (replicated on ``mesh``) for inputs shaped like ``example`` (one row of
    the training arrays) and ``class_tokens``."""
    compiler_options = _compiler_options(config)
    # Zeros of the inputs' shapes: the initial parameters depend on shapes only, and a program
    # without the data in it is the same program for every run of this shape (compiled once).
    zeros = lambda a: jnp.zeros(a.shape, a.dtype)  # noqa: E731

    def init(key):
        variables = model.init(key, zeros(example["image"]), zeros(example["input_ids"]),
                               zeros(example["attention_mask"]), *map(zeros, class_tokens),
                               train=False)
        return variables["params"], variables.get("batch_stats", {})

    params, batch_stats = jax.jit(init, out_shardings=parallel.replicated(mesh),
                                  compiler_options=compiler_options)(key)
    from daug_jax.models.backbones import load_pretrained

    loaded = load_pretrained(params, config.model, model)  # checkpoint weights, if any
    if loaded is not params:
        params = parallel.replicate(loaded, mesh)
    opt_state = jax.jit(tx.init, out_shardings=parallel.replicated(mesh))(params)
    return TrainState(step=parallel.replicate(jnp.zeros((), jnp.int32), mesh), params=params,
                      batch_stats=batch_stats, opt_state=opt_state)


def step_constants(class_tokens: tuple, config: Any, key: jax.Array) -> dict:
    """What a run's steps hold fixed, as arrays: the class prompts' tokens ``class_ids`` /
    ``class_mask`` [C', L], the hybrid loss's weight ``clip_weight`` [] (``train.clip_weight``)
    and the run's dropout key ``dropout_key`` (folded with the step number at every step).

    Arguments of the compiled step rather than constants inside it: runs that differ only in
    these (the ablation's variants and seeds) then share one compiled program, and a population
    of runs (`daug_jax.population`) stacks them along its member axis.
    """
    ids, mask = class_tokens
    return {"class_ids": jnp.asarray(ids, jnp.int32), "class_mask": jnp.asarray(mask, jnp.int32),
            "clip_weight": jnp.asarray(float(config.train.clip_weight), jnp.float32),
            "dropout_key": key}


def make_train_step(model: TwoTower, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    *, prompts: str = "single", skip_nonfinite: bool = False):
    """``train_step(state, batch, consts) -> (state, metrics)``, pure; jit it with the mesh shardings.

    prompts: the class-prompt form of the image-class term (``model.prompts``, see
    `losses.class_logits`).
    skip_nonfinite: a step with a non-finite loss or gradient norm leaves parameters, batch
    statistics and optimizer state unchanged and reports ``skipped`` = 1 (`guard.keep_if_finite`).

    batch: image [B, H, W, in_channels] (from `tower_batch`), input_ids / attention_mask [B, L],
    labels / label_mask [B, C']; consts: `step_constants`.  Metrics: float32 scalars.
    """

    def train_step(state: TrainState, batch: dict, consts: dict) -> tuple[TrainState, dict]:
        dropout_key = jax.random.fold_in(consts["dropout_key"], state.step)

        def loss_fn(params):
            variables = {"params": params}
            if state.batch_stats:
                variables["batch_stats"] = state.batch_stats
            out, updates = model.apply(
                variables, batch["image"], batch["input_ids"], batch["attention_mask"],
                consts["class_ids"], consts["class_mask"], train=True,
                rngs={"dropout": dropout_key}, mutable=["batch_stats"])
            loss, parts = hybrid_contrastive_loss(
                out["image_emb"], out["text_emb"], out["class_emb"], batch["labels"],
                batch["label_mask"], logit_scale=out["logit_scale"],
                class_scale=out["class_scale"], class_bias=out["class_bias"],
                clip_weight=consts["clip_weight"], prompts=prompts)
            scalars = {k: out[k] for k in ("logit_scale", "class_scale", "class_bias")}
            return loss, (parts, scalars, updates.get("batch_stats", state.batch_stats))

        (loss, (parts, scalars, batch_stats)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = clamp_logit_scale(optax.apply_updates(state.params, updates),
                                   model.max_logit_scale)
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss, **parts, **scalars, "grad_norm": grad_norm,
                   "lr": schedule(state.step)}
        if skip_nonfinite:
            (params, batch_stats, opt_state), metrics["skipped"] = keep_if_finite(
                loss, grad_norm, (params, batch_stats, opt_state),
                (state.params, state.batch_stats, state.opt_state))
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state)
        return new_state, metrics

    return train_step


def _compiler_options(config: Any) -> dict | None:
    """XLA options for the compiled programs (``train.compiler_options``), e.g.
    {"xla_backend_optimization_level": 0}: about half the CPU compile time, slower steps."""
    options = config.train.get("compiler_options", None)
    return dict(options) if options else None


# ----------------------------------------------------------------------------- files
def _write_text(path: str, text: str) -> None:
    """Process 0 writes ``path`` whole (temp file, then rename)."""
    if jax.process_index() == 0:
        files.write_text(path, text)


def _read_histories(path: str, upto_step: int, members: list[dict]) -> dict[str, list]:
    """Each member's logged intervals up to the restored step (later lines belong to the lost
    tail of a run); a one-member run's lines carry no member name."""
    histories = {m["name"]: [] for m in members}
    if not os.path.exists(path):
        return histories
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    for r in records:
        name = r.pop("member", members[0]["name"])
        if r["step"] <= upto_step and name in histories:
            histories[name].append(r)
    return histories


# ----------------------------------------------------------------------------- training
def train_towers(config: ml_collections.ConfigDict, source: Any, workdir: str, *,
                 class_names: Sequence[str] = synthetic.CLASS_NAMES, heatmaps: Any = None,
                 until_step: int | None = None, progress: bool = True) -> tuple[TrainState, list]:
    """Trains (or resumes) the two towers on the records of ``source``; returns (state, history).

    source: random-access split (records: "image" [H, W, 1], "labels" [C] in {-1, 0, 1},
    optional "missing" [C], "report", "id"), read in streamed batches; class_names: its C label
    columns; heatmaps: a source aligned with ``source`` by index (`HeatmapSource`), read when
    ``model.vision.fill`` is "heatmaps".
    history: one dict per logging interval ({"step", "loss", "image_text", "image_class",
    "logit_scale", ..., "sec_per_step"}), also written to ``workdir/metrics.jsonl``; the first
    interval's sec_per_step includes compilation.
    until_step: stop after this many steps (the schedule still spans ``train.steps``); a later
    call continues from the checkpoint written there.
    """
    state, histories = _fit(config, None, source, workdir, class_names=class_names,
                            heatmaps=heatmaps, until_step=until_step, progress=progress)
    return population.take(state, 0), histories["run"]


def train_population(config: ml_collections.ConfigDict, members: Sequence[dict], source: Any,
                     workdir: str, *, class_names: Sequence[str] = synthetic.CLASS_NAMES,
                     heatmaps: Any = None, until_step: int | None = None,
                     progress: bool = True) -> tuple[TrainState, dict[str, list]]:
    """Trains (or resumes) M towers of ``config`` that differ in seed, fill and clip weight
    (`population.resolve`) as one vmapped program; returns (state with every leaf [M, ...],
    {member name: history}).  Arguments as for `train_towers`; ``load_towers(workdir, name)``
    reads one member back.
    """
    return _fit(config, members, source, workdir, class_names=class_names, heatmaps=heatmaps,
                until_step=until_step, progress=progress)


def _setup(config, members, source, workdir, class_names, heatmaps):
    """Reader, tokenizer, resolved members and their configs, class-prompt tokens."""
    members = population.resolve(config, members)
    configs = [population.member_config(config, m) for m in members]
    # One reader for all members: heatmaps when any member reads them, reports when any trains
    # the image-report term (a member with weight 0 ignores them: its CLIP term has weight 0).
    reader_cfg = next((c for c in configs if c.model.vision.fill == "heatmaps"), configs[0])
    reader = make_reader(reader_cfg, source, class_names, heatmaps,
                         reports=any(uses_reports(c) for c in configs))
    names = class_names_of(config, class_names)
    # A tokenizer learnt from scratch reads every report once, streamed (no split in memory).
    text_cfg = config.model.text
    reports = report_corpus(reader) if reader.reports and not text_cfg.get("path") else ()
    os.makedirs(workdir, exist_ok=True)
    tokenizer = make_tokenizer(text_cfg, reports, workdir, names)
    class_tokens = tuple(jnp.asarray(a) for a in text_lib.tokenize(
        tokenizer, class_prompts(names, config.model.get("prompts", "single")),
        int(text_cfg.max_length)))
    return reader, tokenizer, members, configs, names, class_tokens


def _fit(config, members, source, workdir, *, class_names, heatmaps, until_step, progress):
    """The training loop of `train_towers` / `train_population` (every state leaf [M, ...])."""
    train_cfg = config.train
    reader, tokenizer, members, configs, names, class_tokens = _setup(
        config, members, source, workdir, class_names, heatmaps)
    impl = train_cfg.get("prng_impl", "threefry2x32")
    if len(members) > 1 and impl != "threefry2x32":
        # Under vmap, RBG keys draw other bits than the same key alone (measured: dropout masks
        # differ), so members would not be the runs they stand for.
        raise ValueError(f"a population of {len(members)} towers needs "
                         f"train.prng_impl=threefry2x32, not {impl!r}: vmapped {impl} keys draw "
                         "other numbers than each run alone")

    def stream(start_step: int):  # batches are a function of (seed, step), per member seed
        return population.batches(configs, members, tokenizer, {
            seed: train_batches(reader, int(train_cfg.batch_size), seed=seed,
                                start_step=start_step,
                                num_threads=int(train_cfg.get("input_threads", 2)))
            for seed in sorted({m["seed"] for m in members})})

    batches = stream(0)
    first = next(batches)  # bad input fails here
    meta = {"class_names": names, "in_channels": int(config.model.vision.in_channels),
            "members": members, "image_shape": [int(s) for s in first["image"].shape[2:4]]}
    saved = ml_collections.ConfigDict(config.to_dict())
    saved.model.class_names = names  # resolved: `load_towers` needs no data
    _write_text(os.path.join(workdir, "config.json"), saved.to_json(indent=2))
    _write_text(os.path.join(workdir, "members.json"), json.dumps(members, indent=2))

    mesh = parallel.make_mesh()
    model = build_two_tower(config.model, bert_config(config.model.text, len(tokenizer)))
    tx, schedule = make_optimizer(train_cfg)
    states, consts = [], []
    example = {k: v[0, :1] for k, v in first.items()}
    for member, cfg in zip(members, configs):  # one compiled init, run once per member
        root = jax.random.key(member["seed"], impl=impl)
        init_key, step_key = jax.random.split(root)
        states.append(create_state(model, tx, init_key, example, class_tokens, cfg, mesh))
        consts.append(step_constants(class_tokens, cfg, step_key))
    rep = parallel.replicated(mesh)
    state, consts = (jax.device_put(population.stack(t), rep) for t in (states, consts))
    del states

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                        save_every=int(train_cfg.checkpoint_every))
    state, saved_meta, start = ckpt.restore_or(state)
    for key, value in meta.items():
        if key in saved_meta and saved_meta[key] != value:
            raise ValueError(f"{workdir} holds a run with {key}={saved_meta[key]!r}, this config "
                             f"has {value!r}; use another --workdir")
    if start:  # resumed: the stream restarts at the restored step
        batches, first = stream(start), None
    histories = _read_histories(os.path.join(workdir, "metrics.jsonl"), start, members)
    one = make_train_step(model, tx, schedule, prompts=config.model.get("prompts", "single"),
                          skip_nonfinite=bool(train_cfg.get("skip_nonfinite", False)))
    step_fn = jax.jit(jax.vmap(one), in_shardings=(rep, parallel.data_sharding(mesh, axis=1), rep),
                      out_shardings=rep, donate_argnums=0,
                      compiler_options=_compiler_options(config))
    chunks = population.Chunks(len(members), train_cfg.get("member_chunk"))
    parts, const_parts = chunks.split(state), chunks.split(consts)
    del state
    steps = int(train_cfg.steps)
    stop = steps if until_step is None else min(int(until_step), steps)
    log = _Logger(workdir, members, histories, start)
    log_every, every = max(1, int(train_cfg.get("log_every", 50))), int(train_cfg.checkpoint_every)
    desc = "train towers" if len(members) == 1 else f"train {len(members)} towers"
    with tqdm(range(start, stop), initial=start, total=steps, desc=desc, unit="step",
              disable=not progress) as bar:
        for step in bar:
            host = first if first is not None else next(batches)
            first = None
            out = [step_fn(part, parallel.shard_batch({k: v[sl] for k, v in host.items()}, mesh,
                                                      axis=1), c)
                   for part, c, sl in zip(parts, const_parts, chunks.slices)]
            parts = [o[0] for o in out]
            log.pending.append(chunks.join([o[1] for o in out]))  # read once per interval
            done = step + 1
            logs, saves = done % log_every == 0 or done == stop, done % every == 0 or done == stop
            if not (logs or saves):
                continue
            log.flush(done, record=logs, bar=bar)  # checked before anything is saved
            if saves and ckpt.latest_step() != done:
                ckpt.save(done, chunks.join(parts), meta, force=True)
                log.saved = done
    ckpt.close()
    return chunks.join(parts), log.histories


class _Logger:
    """Per-member metric rows: read from the device once per interval, checked finite (a
    checkpoint never holds a non-finite update), averaged into one history record per member
    and interval, written to ``metrics.jsonl``."""

    def __init__(self, workdir: str, members: list[dict], histories: dict, start: int):
        self.workdir, self.members, self.histories = workdir, members, histories
        self.saved = start or None
        self.pending, self.interval, self.tick = [], [], time.time()

    def flush(self, done: int, *, record: bool, bar: Any) -> None:
        """Reads and checks the queued steps' metrics ({name: [M]}); ``record``: end an interval."""
        first = done - len(self.pending) + 1
        rows = [[{"step": first + i, **{k: float(v[m]) for k, v in step.items()}}
                 for m in range(len(self.members))]
                for i, step in enumerate(jax.device_get(self.pending))]
        check_finite([r for step in rows for r in step], name="train", workdir=self.workdir,
                     last_saved=self.saved)
        self.interval, self.pending = self.interval + rows, []
        if record:
            self._record(done, bar)

    def _record(self, done: int, bar: Any) -> None:
        seconds = (time.time() - self.tick) / len(self.interval)
        for m, member in enumerate(self.members):
            rows = [step[m] for step in self.interval]
            record = {"step": done, **{k: float(np.mean([r[k] for r in rows]))
                                       for k in rows[0] if k != "step"}}
            if "skipped" in record:
                record["skipped"] = int(sum(r["skipped"] for r in rows))
            record["sec_per_step"] = seconds
            self.histories[member["name"]].append(record)
        lines = [json.dumps({**r, "member": name} if len(self.members) > 1 else r) + "\n"
                 for name, history in self.histories.items() for r in history]
        _write_text(os.path.join(self.workdir, "metrics.jsonl"), "".join(lines))
        last = self.histories[self.members[0]["name"]][-1]
        bar.set_postfix(image_text=f"{last['image_text']:.3f}",
                        image_class=f"{last['image_class']:.3f}")
        self.interval, self.tick = [], time.time()


def load_towers(workdir: str, member: str | None = None
                ) -> tuple[TwoTower, dict, Any, ml_collections.ConfigDict]:
    """The latest checkpoint of a run: (model, variables, tokenizer, config).

    variables: {"params": ..., "batch_stats": ...} for ``model.apply(..., method=...)``, e.g.
    ``model.apply(variables, images, method=TwoTower.encode_image)``.  member: which member of a
    population (`train_population`) to read, by name; config is then that member's config.
    """
    name = pick_member(saved_configs(workdir), member, workdir)
    model, stacked, tokenizer, configs = load_population(workdir)
    return model, population.take(stacked, list(configs).index(name)), tokenizer, configs[name]


def saved_configs(workdir: str) -> dict[str, ml_collections.ConfigDict]:
    """{member name: its config} of the run in ``workdir``, from its saved files alone."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no trained towers in {workdir} (missing {path})")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    members = population.resolve(config, files.read_json(os.path.join(workdir, "members.json"),
                                                         None))
    return {m["name"]: population.member_config(config, m) for m in members}


def pick_member(configs: dict, member: str | None, workdir: str) -> str:
    """The member name ``member`` names (None: the only member), or a ValueError saying which
    names there are."""
    names = list(configs)
    if member is None and len(names) > 1:
        raise ValueError(f"{workdir} holds {len(names)} towers; name one of {names}")
    if member is not None and member not in names:
        raise ValueError(f"{workdir} has no member {member!r}; its members: {names}")
    return names[0] if member is None else member


def load_population(workdir: str) -> tuple[TwoTower, dict, Any, dict]:
    """Every member of a run's latest checkpoint, restored once: (model, variables with every
    leaf [M, ...], tokenizer, {member name: its config}) — members share the model's shape."""
    configs = saved_configs(workdir)
    config = next(iter(configs.values()))  # the shape every member shares
    from transformers import AutoTokenizer

    tok_dir = config.model.text.get("path") or os.path.join(workdir, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    model = build_two_tower(config.model, bert_config(config.model.text, len(tokenizer)))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {os.path.join(workdir, 'checkpoints')}")
    tx, _ = make_optimizer(config.train)
    length, channels = int(config.model.text.max_length), int(config.model.vision.in_channels)
    class_tokens = (jnp.zeros((len(config.model.class_names), length), jnp.int32),) * 2

    def fresh():
        # Only abstract (eval_shape): the restore needs shapes, dtypes and shardings, not values.
        # Parameter shapes do not depend on the image size (global pooling).
        size = int(config.data.get("image_size", 32))
        tokens = jnp.zeros((1, length), jnp.int32)
        variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)), tokens,
                               tokens, *class_tokens, train=False)
        params = variables["params"]
        one = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                         batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))
        return population.stack([one] * len(configs))

    replicated = parallel.replicated(parallel.make_mesh())
    template = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                            jax.eval_shape(fresh))
    state, _ = ckpt.restore(template, step)
    ckpt.close()
    return model, {"params": state.params, "batch_stats": state.batch_stats}, tokenizer, configs


# ----------------------------------------------------------------------------- CLI
def main(command: str, argv: list[str]) -> int:
    from daug_jax.data import registry

    parser = argparse.ArgumentParser(prog=f"daug-jax {command}",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="towers", help="experiments/<name>.py or a .py path")
    parser.add_argument("--workdir", default="runs/towers")
    registry.add_data_args(parser)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--until-step", type=int, default=None,
                        help="stop after this step; rerun to continue")
    args = parser.parse_args(argv)
    parallel.maybe_initialize_distributed()
    from daug_jax.config import load_config

    config = load_config(args.config, args.set)
    registry.apply_data_args(config, args)
    dataset = registry.open_dataset(config.data)
    if uses_reports(config) and not dataset.has_reports:
        raise ValueError(f"{dataset.name} has no reports: train class-only towers with "
                         f"--set train.clip_weight=0")
    split = config.data.get("train_split", "train")
    source = dataset.source(split)
    heatmaps = open_heatmaps(config, source, split)
    from daug_jax.lock import workdir_lock

    with workdir_lock(args.workdir, what=command):  # one run per workdir
        _, history = train_towers(config, source, args.workdir, class_names=dataset.class_names,
                                  heatmaps=heatmaps, until_step=args.until_step)
    if history:
        a, b = history[0], history[-1]
        print(f"towers: steps {a['step']} -> {b['step']}: image-text loss {a['image_text']:.4f} -> "
              f"{b['image_text']:.4f}, image-class loss {a['image_class']:.4f} -> "
              f"{b['image_class']:.4f} ({b['sec_per_step']:.3f} s/step); metrics in {args.workdir}")
    return 0
