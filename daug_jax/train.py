"""``daug-jax train``: the two towers with the Image-Text-Class hybrid loss, on a data mesh.

    daug-jax train --config towers --workdir runs/towers [--set train.steps=100 ...]

One jitted, pure ``train_step(state, batch) -> (state, metrics)`` (`make_train_step`) in the
shared loop (`daug_jax.loop`: a killed run rerun with the same command resumes exactly):
parameters replicated, the batch split over the mesh's "data" axis, the state donated.  A
population of runs that differ in seed, fill and loss weight (an ablation) is the same step
under ``jax.vmap`` (`train_population`).

Input: a random-access split of any registered dataset (`data.registry`), streamed through
`data.pipeline`, and, for DAug towers, the heatmap dataset of that split joined by index and id
(`tower_inputs`).  The encoder input is the image plus ``in_channels - 1`` extra channels,
filled per ``model.vision.fill``: "repeat" (the image again: the baseline) or "heatmaps".  The
loss is ``w · L_image-text + (1 − w) · L_image-class`` with w = ``train.clip_weight``; with
w = 0 the towers train on class labels alone and need no reports (CheXpert, NIH).

Workdir: checkpoints/ (orbax), tokenizer/ (trained from scratch), config.json (+ members.json
for a population), metrics.jsonl (one line per logging interval: the mean of each metric).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from transformers import AutoTokenizer

from daug_jax import files, loop, parallel, population
from daug_jax.checkpoint import Checkpointer
from daug_jax.data import registry
from daug_jax.data.pipeline import train_batches
from daug_jax.lock import workdir_lock
from daug_jax.losses import hybrid_contrastive_loss
from daug_jax.models.two_tower import (TwoTower, build_two_tower, clamp_logit_scale,
                                       load_pretrained, text_shape)
from daug_jax.tower_inputs import (class_names_of, class_prompt_tokens, make_reader,
                                   make_tokenizer, open_heatmaps, report_corpus, tower_batch,
                                   uses_reports)


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; checkpointed whole, replicated on the mesh.

    A run's seed and loss weight ride along, so that runs differing only in them (the
    ablation's variants and seeds) share one compiled step and a population stacks them.
    """
    step: jax.Array         # [] int32: completed steps
    params: Any
    batch_stats: Any        # BatchNorm running averages; {} with GroupNorm
    opt_state: Any
    seed: jax.Array         # [] int32: train.seed (initial parameters and dropout)
    clip_weight: jax.Array  # [] float32: w of the hybrid loss (train.clip_weight)


# ----------------------------------------------------------------------------- the step
def weight_decay_mask(params: Any) -> Any:
    """True where AdamW decays: matrices and embeddings (ndim > 1).  Decaying norm scales, biases
    or the temperature would pull them towards 0, which is not a simpler model; Flax keeps
    biases and LayerNorm parameters 1-D, so none of them is decayed (the authors' rule too)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(train_config: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup and cosine decay over ``train.steps``; global-norm clipping; the
    CLIP temperature learned unless ``train.learn_logit_scale`` is False."""
    steps, warmup = int(train_config.steps), int(train_config.warmup)
    frozen = None
    if not train_config.learn_logit_scale:
        # The authors hold the CLIP temperature fixed (exp 4.602 ~ 100): its gradient is zeroed
        # before clipping, so it neither moves nor takes a share of the clipped norm.
        frozen = lambda params: {k: jax.tree.map(lambda _: k == "log_logit_scale", v)  # noqa: E731
                                 for k, v in params.items()}
    return loop.adamw(learning_rate=train_config.lr, warmup=warmup,
                      grad_clip=train_config.grad_clip, weight_decay=train_config.weight_decay,
                      decay_steps=max(steps, warmup + 1), decay_mask=weight_decay_mask,
                      frozen=frozen)


def _keys(seed: jax.Array, impl: str) -> tuple[jax.Array, jax.Array]:
    """A run's (init key, dropout key), both from its seed."""
    init_key, dropout_key = jax.random.split(jax.random.key(seed, impl=impl))
    return init_key, dropout_key


def init_fn(model: TwoTower, tx: optax.GradientTransformation, example: dict,
            class_tokens: tuple, impl: str):
    """``init(seed, clip_weight) -> TrainState`` for inputs shaped like ``example`` (one row of
    a train step's arrays) and ``class_tokens``; vmapped over seeds it makes a population."""
    # Zeros of the inputs' shapes: the initial parameters depend on shapes only, and a program
    # without the data in it is the same program for every run of this shape (compiled once).
    zeros = lambda a: jnp.zeros(a.shape, a.dtype)  # noqa: E731

    def init(seed, clip_weight):
        variables = model.init(_keys(seed, impl)[0], zeros(example["image"]),
                               zeros(example["input_ids"]), zeros(example["attention_mask"]),
                               *map(zeros, class_tokens), train=False)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                          seed=jnp.asarray(seed, jnp.int32),
                          clip_weight=jnp.asarray(clip_weight, jnp.float32))

    return init


def make_train_step(model: TwoTower, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    class_tokens: tuple, config: Any):
    """``train_step(state, batch) -> (state, metrics)``, pure; jit it with the mesh shardings,
    or vmap it over a population's stacked states and batches.

    batch: image [B, H, W, in_channels] (`tower_inputs.tower_batch`), input_ids / attention_mask
    [B, L], labels / label_mask [B, C']; class_tokens: the class prompts' (ids, mask) [P, L']
    (`tower_inputs.class_prompt_tokens`).  ``model.prompts`` sets the class term's form
    (`losses.class_logits`); ``train.skip_nonfinite``: `loop.keep_if_finite`.  Metrics: float32
    scalars.
    """
    prompts, impl = config.model.prompts, config.train.prng_impl
    skip_nonfinite = bool(config.train.skip_nonfinite)
    class_ids, class_mask = class_tokens

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        dropout_key = jax.random.fold_in(_keys(state.seed, impl)[1], state.step)

        def loss_fn(params):
            variables = {"params": params}
            if state.batch_stats:
                variables["batch_stats"] = state.batch_stats
            out, updates = model.apply(
                variables, batch["image"], batch["input_ids"], batch["attention_mask"],
                class_ids, class_mask, train=True, rngs={"dropout": dropout_key},
                mutable=["batch_stats"])
            loss, parts = hybrid_contrastive_loss(out, batch["labels"], batch["label_mask"],
                                                  clip_weight=state.clip_weight, prompts=prompts)
            scalars = {k: out[k] for k in ("logit_scale", "class_scale", "class_bias")}
            return loss, (parts, scalars, updates.get("batch_stats", state.batch_stats))

        (loss, (parts, scalars, batch_stats)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        params, opt_state, grad_norm = loop.apply_update(tx, state.params, state.opt_state, grads)
        new = {"params": clamp_logit_scale(params, model.max_logit_scale), "opt_state": opt_state,
               "batch_stats": batch_stats}
        metrics = {"loss": loss, **parts, **scalars, "grad_norm": grad_norm,
                   "lr": schedule(state.step)}
        if skip_nonfinite:
            new, metrics["skipped"] = loop.keep_if_finite(
                loss, grad_norm, new, {k: getattr(state, k) for k in new})
        return state.replace(step=state.step + 1, **new), metrics

    return train_step


# ----------------------------------------------------------------------------- training
class _Start(NamedTuple):
    """What a run and a population both start from."""
    step: Any             # the jitted (vmapped, for a population) `make_train_step`
    ckpt: Checkpointer
    meta: dict            # saved with every checkpoint, checked on resume
    mesh: Any
    state: TrainState
    start: int            # the step to continue from
    batches: Any          # host batches from step ``start`` on
    first: dict | None    # the first of them, already read (None when resumed)


def _start(config, members, source, workdir, class_names, heatmaps) -> _Start:
    """Sets up a run (``members`` None) or a population (resolved members): reads the first
    batch (bad input fails here), makes the initial state (pretrained weights loaded) or
    restores the latest checkpoint, and writes config.json (+ members.json) with the class
    names resolved, so that `load_towers` needs no data."""
    t, many = config.train, members is not None
    configs = [population.member_config(config, m) for m in members] if many else [config]
    # One reader for every run: heatmaps when any run reads them, reports when any trains the
    # image-report term (a run with weight 0 ignores them: its CLIP term has weight 0).
    reader_cfg = next((c for c in configs if c.model.vision.fill == "heatmaps"), configs[0])
    reader = make_reader(reader_cfg, source, class_names, heatmaps,
                         reports=any(uses_reports(c) for c in configs))
    names = class_names_of(config, class_names)
    # A tokenizer learnt from scratch reads every report once, streamed (no split in memory).
    reports = report_corpus(reader) if reader.reports and not config.model.text.path else ()
    os.makedirs(workdir, exist_ok=True)
    tokenizer = make_tokenizer(config.model.text, reports, workdir, names)
    class_tokens = tuple(jnp.asarray(a)
                         for a in class_prompt_tokens(tokenizer, names, config.model))
    model = build_two_tower(config.model, text_shape(config.model.text, len(tokenizer)))
    tx, schedule = make_optimizer(t)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=int(t.checkpoint_every))

    def stream(start: int):  # a pure function of (seed, step); each member reads its seed's
        seeds = sorted({m["seed"] for m in members}) if many else [int(t.seed)]
        read = {seed: train_batches(reader, int(t.batch_size), seed=seed, start_step=start,
                                    num_threads=int(t.input_threads)) for seed in seeds}
        if many:
            return population.batches(configs, members, tokenizer, read)
        return (tower_batch(config, tokenizer, batch) for batch in read[int(t.seed)])

    batches = stream(0)
    first = next(batches)  # bad input fails here
    # XLA options, e.g. {"xla_backend_optimization_level": 0}: about half the CPU compile time,
    # slower steps.
    mesh, options = parallel.make_mesh(), dict(t.compiler_options) or None
    rep = parallel.replicated(mesh)
    meta = {"class_names": names, "in_channels": int(config.model.vision.in_channels),
            **({"members": members} if many else {}),
            "image_shape": [int(d) for d in first["image"].shape[-3:-1]]}
    init = init_fn(model, tx, {k: v[0, :1] if many else v[:1] for k, v in first.items()},
                   class_tokens, t.prng_impl)
    if many:
        state = jax.jit(jax.vmap(init), out_shardings=rep, compiler_options=options)(
            jnp.asarray([m["seed"] for m in members], jnp.int32),
            jnp.asarray([m["clip_weight"] for m in members], jnp.float32))
        first_params = population.take(state.params, 0)
        if load_pretrained(first_params, config.model, model) is not first_params:
            state = state.replace(params=parallel.replicate(population.stack([
                load_pretrained(population.take(state.params, m), c.model, model)
                for m, c in enumerate(configs)]), mesh))
    else:
        state = jax.jit(init, out_shardings=rep, compiler_options=options)(
            int(t.seed), float(t.clip_weight))
        pretrained = load_pretrained(state.params, config.model, model)
        if pretrained is not state.params:  # checkpoint weights
            state = state.replace(params=parallel.replicate(pretrained, mesh))
    state, start = loop.resume(ckpt, state, meta, workdir)
    # Written once the metadata check passed: a refused run leaves the old run's files alone.
    if jax.process_index() == 0:
        saved = ml_collections.ConfigDict(config.to_dict())
        saved.model.class_names = names
        files.write_text(os.path.join(workdir, "config.json"), saved.to_json(indent=2))
        if many:
            files.write_text(os.path.join(workdir, "members.json"), json.dumps(members, indent=2))
    step = make_train_step(model, tx, schedule, class_tokens, config)
    step = jax.jit(jax.vmap(step) if many else step,
                   in_shardings=(rep, parallel.data_sharding(mesh, axis=int(many))),
                   out_shardings=rep, donate_argnums=0, compiler_options=options)
    if start:  # resumed: the streams restart at the restored step
        batches, first = stream(start), None
    return _Start(step, ckpt, meta, mesh, state, start, batches, first)


def _job(config, s: _Start, workdir, until_step, progress, **extra) -> loop.Job:
    t = config.train
    return loop.Job(name="train", workdir=workdir, steps=int(t.steps), log_every=int(t.log_every),
                    save_every=int(t.checkpoint_every), log_file="metrics.jsonl",
                    ckpt=s.ckpt, meta=s.meta, stop=until_step, average=True,
                    postfix=("image_text", "image_class"), progress=progress, **extra)


def train_towers(config: ml_collections.ConfigDict, source: Any, workdir: str, *,
                 class_names: Sequence[str], heatmaps: Any = None, until_step: int | None = None,
                 progress: bool = True) -> tuple[TrainState, list]:
    """Trains (or resumes) the two towers on the records of ``source``; returns (state, history).

    source: random-access split (records: "image" [H, W, 1], "labels" [C] in {-1, 0, 1},
    optional "missing" [C], "report", "id"), read in streamed batches; class_names: its C label
    columns; heatmaps: a source aligned with ``source`` by index (`HeatmapSource`), read when
    ``model.vision.fill`` is "heatmaps".
    history: the records of ``workdir/metrics.jsonl`` ({"step", "loss", "image_text",
    "image_class", "logit_scale", ..., "sec_per_step"}: the first includes compilation).
    until_step: stop after this many steps (the schedule still spans ``train.steps``); a later
    call continues from the checkpoint written there.
    """
    s = _start(config, None, source, workdir, class_names, heatmaps)
    job = _job(config, s, workdir, until_step, progress, desc="train towers")
    return loop.fit(job, s.state, lambda state, host: s.step(state, parallel.shard_batch(
        host, s.mesh)), s.batches, start=s.start, first=s.first)


def train_population(config: ml_collections.ConfigDict, members: Sequence[dict], source: Any,
                     workdir: str, *, class_names: Sequence[str], heatmaps: Any = None,
                     until_step: int | None = None, progress: bool = True
                     ) -> tuple[TrainState, dict[str, list]]:
    """Trains (or resumes) a population (`daug_jax.population`) of M runs of ``config``, as
    `population.resolve` reads ``members``; returns (state with every leaf [M, ...], {member
    name: history}).  Arguments as for `train_towers`; `load_towers` reads one member back."""
    members = population.resolve(config, members)
    if len(members) > 1 and config.train.prng_impl != "threefry2x32":
        # Under vmap, other keys draw other bits than the same key alone (measured: dropout
        # masks differ), so members would not be the runs they stand for.
        raise ValueError(f"a population of {len(members)} towers needs "
                         f"train.prng_impl=threefry2x32, not {config.train.prng_impl!r}: vmapped "
                         "keys of other implementations draw other numbers than each run alone")
    s = _start(config, members, source, workdir, class_names, heatmaps)
    chunks = population.Chunks(len(members), config.train.member_chunk)

    def population_step(parts, host):
        out = [s.step(part, parallel.shard_batch({k: v[sl] for k, v in host.items()}, s.mesh, 1))
               for part, sl in zip(parts, chunks.slices)]
        return [o[0] for o in out], chunks.join([o[1] for o in out])

    job = _job(config, s, workdir, until_step, progress, members=[m["name"] for m in members],
               saved_view=chunks.join, desc=f"train {len(members)} towers")
    parts, histories = loop.fit(job, chunks.split(s.state), population_step, s.batches,
                                start=s.start, first=s.first)
    return chunks.join(parts), histories


# ----------------------------------------------------------------------------- loading
class Towers(NamedTuple):
    """Trained towers: ``model.apply(variables, images, method=TwoTower.encode_image)``."""
    model: TwoTower
    variables: dict     # {"params": ..., "batch_stats": ...}
    tokenizer: Any
    config: ml_collections.ConfigDict


def saved_configs(workdir: str) -> dict[str, ml_collections.ConfigDict]:
    """{run name: its config} of the run (one, named "run") or population in ``workdir``, from
    its saved files alone."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no trained towers in {workdir} (missing {path})")
    config = ml_collections.ConfigDict(files.read_json(path))
    members = files.read_json(os.path.join(workdir, "members.json"), None)
    if members is None:
        return {"run": config}
    return {m["name"]: population.member_config(config, m)
            for m in population.resolve(config, members)}


def pick_member(configs: dict, member: str | None, workdir: str) -> str:
    """The run name ``member`` names (None: the only run), or a ValueError saying which names
    there are."""
    names = list(configs)
    if member is None and len(names) > 1:
        raise ValueError(f"{workdir} holds {len(names)} towers; name one of {names}")
    if member is not None and member not in names:
        raise ValueError(f"{workdir} has no member {member!r}; its members: {names}")
    return names[0] if member is None else member


def load_runs(workdir: str) -> dict[str, Towers]:
    """Every run of ``workdir``'s latest checkpoint, restored once: {run name: `Towers`}."""
    configs = saved_configs(workdir)
    config = next(iter(configs.values()))  # the shape every member shares
    tok_dir = config.model.text.path or os.path.join(workdir, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    model = build_two_tower(config.model, text_shape(config.model.text, len(tokenizer)))
    tx, _ = make_optimizer(config.train)
    length, size = int(config.model.text.max_length), int(config.data.image_size)
    tokens = jnp.zeros((1, length), jnp.int32)
    class_tokens = (jnp.zeros((len(config.model.class_names), length), jnp.int32),) * 2
    # Parameter shapes do not depend on the image size (global pooling).
    example = {"image": jnp.zeros((1, size, size, int(config.model.vision.in_channels))),
               "input_ids": tokens, "attention_mask": tokens}
    init = init_fn(model, tx, example, class_tokens, config.train.prng_impl)
    many = "members.json" in os.listdir(workdir)
    seeds = jnp.zeros((len(configs),) if many else (), jnp.int32)
    # Only abstract (eval_shape): the restore needs shapes, dtypes and shardings, not values.
    init = jax.jit(jax.vmap(init) if many else init,
                   out_shardings=parallel.replicated(parallel.make_mesh()))
    template = jax.eval_shape(init, seeds, seeds.astype(jnp.float32))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint under {os.path.join(workdir, 'checkpoints')}")
    state, _ = ckpt.restore(template)
    ckpt.close()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return {name: Towers(model, population.take(variables, m) if many else variables, tokenizer,
                         run_config) for m, (name, run_config) in enumerate(configs.items())}


def load_towers(workdir: str, member: str | None = None) -> Towers:
    """The latest checkpoint of a run: (model, variables, tokenizer, config).  member: which
    member of a population (`train_population`) to read, by name; config is that member's."""
    return load_runs(workdir)[pick_member(saved_configs(workdir), member, workdir)]


# ----------------------------------------------------------------------------- CLI
def main(command: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"daug-jax {command}",
                                     description=__doc__.splitlines()[0])
    registry.add_run_args(parser, config="towers", workdir="runs/towers",
                          example="train.steps=100")
    parser.add_argument("--until-step", type=int, default=None,
                        help="stop after this step; rerun to continue")
    args = parser.parse_args(argv)
    config, dataset = registry.open_run(args)
    if uses_reports(config) and not dataset.has_reports:
        raise ValueError(f"{dataset.name} has no reports: train class-only towers with "
                         f"--set train.clip_weight=0")
    split = config.data.train_split
    source = dataset.source(split)
    heatmaps = open_heatmaps(config, source, split)
    with workdir_lock(args.workdir, what=command):  # one run per workdir
        _, history = train_towers(config, source, args.workdir, class_names=dataset.class_names,
                                  heatmaps=heatmaps, until_step=args.until_step)
    if history:
        a, b = history[0], history[-1]
        print(f"towers: steps {a['step']} -> {b['step']}: image-text loss {a['image_text']:.4f} -> "
              f"{b['image_text']:.4f}, image-class loss {a['image_class']:.4f} -> "
              f"{b['image_class']:.4f} ({b['sec_per_step']:.3f} s/step); metrics in {args.workdir}")
    return 0
