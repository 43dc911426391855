"""``daug-jax train``: the two towers with the Image-Text-Class hybrid loss, on a data mesh.

    daug-jax train --config towers --workdir runs/towers [--set train.steps=100 ...]

One jitted, pure ``train_step(state, batch) -> (state, metrics)`` (`daug_jax.tower_step`) in the
shared loop (`daug_jax.loop`): parameters replicated, the batch split over the mesh's "data"
axis, the state donated.  Batches are a pure function of (seed, step)
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
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from daug_jax import files, loop, parallel, population
from daug_jax.checkpoint import Checkpointer
from daug_jax.data import synthetic
from daug_jax.data.pipeline import train_batches
from daug_jax.models.two_tower import (  # noqa: F401  (assemble_images, bert_config: re-exported)
    TwoTower, assemble_images, bert_config, build_two_tower, class_prompt_tokens)
from daug_jax.tower_inputs import (class_names_of, make_reader, make_tokenizer, open_heatmaps,
                                   report_corpus, uses_reports)
from daug_jax.tower_step import (  # noqa: F401  (the step's pieces: re-exported)
    TrainState, create_state, create_states, make_optimizer, make_train_step, step_constants,
    compiler_options_of, weight_decay_mask)


# ----------------------------------------------------------------------------- files
def _write_text(path: str, text: str) -> None:
    """Process 0 writes ``path`` whole (temp file, then rename)."""
    if jax.process_index() == 0:
        files.write_text(path, text)


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
    class_tokens = tuple(jnp.asarray(a)
                         for a in class_prompt_tokens(tokenizer, names, config.model))
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
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                        save_every=int(train_cfg.checkpoint_every))
    mesh = parallel.make_mesh()
    model = build_two_tower(config.model, bert_config(config.model.text, len(tokenizer)))
    tx, schedule = make_optimizer(train_cfg)
    example = {k: v[0, :1] for k, v in first.items()}
    state, consts = _initial_states(model, tx, members, configs, example, class_tokens, mesh)
    state, start = loop.resume(ckpt, state, meta, workdir)
    # Written once the metadata check passed: a refused run leaves the old run's files alone.
    saved = ml_collections.ConfigDict(config.to_dict())
    saved.model.class_names = names  # resolved: `load_towers` needs no data
    _write_text(os.path.join(workdir, "config.json"), saved.to_json(indent=2))
    _write_text(os.path.join(workdir, "members.json"), json.dumps(members, indent=2))
    if start:  # resumed: the stream restarts at the restored step
        batches, first = stream(start), None
    chunks = population.Chunks(len(members), train_cfg.get("member_chunk"))
    job = loop.Job(name="train", workdir=workdir, steps=int(train_cfg.steps),
                   log_every=max(1, int(train_cfg.get("log_every", 50))),
                   save_every=int(train_cfg.checkpoint_every), log_file="metrics.jsonl",
                   members=[m["name"] for m in members], average=True,
                   postfix=("image_text", "image_class"),
                   desc="train towers" if len(members) == 1 else f"train {len(members)} towers")
    parts, histories = loop.fit(job, chunks.split(state),
                                _population_step(model, tx, schedule, config, consts, chunks, mesh),
                                batches, start=start, stop=until_step, ckpt=ckpt, meta=meta,
                                first=first, saved_view=chunks.join, progress=progress)
    return chunks.join(parts), histories


def _initial_states(model, tx, members, configs, example, class_tokens, mesh):
    """Every member's fresh state and step constants, stacked on a leading member axis."""
    impl = configs[0].train.get("prng_impl", "threefry2x32")
    keys = [jax.random.split(jax.random.key(m["seed"], impl=impl)) for m in members]
    state = create_states(model, tx, jnp.stack([k[0] for k in keys]), example, class_tokens,
                          configs, mesh)
    consts = population.stack([step_constants(class_tokens, cfg, k[1])
                               for cfg, k in zip(configs, keys)])
    return state, jax.device_put(consts, parallel.replicated(mesh))


def _population_step(model, tx, schedule, config, consts, chunks, mesh):
    """``step(parts, host) -> (parts, metrics [M])``: the vmapped train step over the
    population's blocks of ``train.member_chunk`` members (``parts``: `chunks.split(state)`)."""
    rep = parallel.replicated(mesh)
    one = make_train_step(model, tx, schedule, prompts=config.model.get("prompts", "single"),
                          skip_nonfinite=bool(config.train.get("skip_nonfinite", False)))
    step_fn = jax.jit(jax.vmap(one), in_shardings=(rep, parallel.data_sharding(mesh, axis=1), rep),
                      out_shardings=rep, donate_argnums=0,
                      compiler_options=compiler_options_of(config))
    const_parts = chunks.split(consts)

    def step(parts, host):
        out = [step_fn(part, parallel.shard_batch({k: v[sl] for k, v in host.items()}, mesh,
                                                  axis=1), c)
               for part, c, sl in zip(parts, const_parts, chunks.slices)]
        return [o[0] for o in out], chunks.join([o[1] for o in out])

    return step


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
    registry.add_run_args(parser, config="towers", workdir="runs/towers",
                          example="train.steps=100")
    parser.add_argument("--until-step", type=int, default=None,
                        help="stop after this step; rerun to continue")
    args = parser.parse_args(argv)
    config, dataset = registry.open_run(args)
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
