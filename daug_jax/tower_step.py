"""The two towers' train step, pure: state, optimizer, step constants, the hybrid-loss update.

``train_step(state, batch, consts) -> (state, metrics)`` is jitted by `daug_jax.train` (one run,
or a population vmapped over members) and by the benchmark (`daug_jax.bench_programs`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

from daug_jax import loop, parallel, population
from daug_jax.losses import hybrid_contrastive_loss
from daug_jax.models.two_tower import TwoTower, clamp_logit_scale


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; checkpointed whole, replicated on the mesh."""
    step: jax.Array   # [] int32: completed steps
    params: Any
    batch_stats: Any  # BatchNorm running averages; {} with GroupNorm
    opt_state: Any


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
    if not train_config.get("learn_logit_scale", True):
        # The authors hold the CLIP temperature fixed (exp 4.602 ~ 100): its gradient is zeroed
        # before clipping, so it neither moves nor takes a share of the clipped norm.
        frozen = lambda params: {k: jax.tree.map(lambda _: k == "log_logit_scale", v)  # noqa: E731
                                 for k, v in params.items()}
    return loop.adamw(learning_rate=train_config.lr, warmup=warmup,
                      grad_clip=train_config.get("grad_clip", 1.0),
                      weight_decay=train_config.weight_decay, decay_steps=max(steps, warmup + 1),
                      decay_mask=weight_decay_mask, frozen=frozen)


def _init_fn(model: TwoTower, example: dict, class_tokens: tuple):
    """``init(key) -> (params, batch_stats)`` for inputs shaped like ``example`` (one row of the
    training arrays) and ``class_tokens``."""
    # Zeros of the inputs' shapes: the initial parameters depend on shapes only, and a program
    # without the data in it is the same program for every run of this shape (compiled once).
    zeros = lambda a: jnp.zeros(a.shape, a.dtype)  # noqa: E731

    def init(key):
        variables = model.init(key, zeros(example["image"]), zeros(example["input_ids"]),
                               zeros(example["attention_mask"]), *map(zeros, class_tokens),
                               train=False)
        return variables["params"], variables.get("batch_stats", {})

    return init


def create_state(model: TwoTower, tx: optax.GradientTransformation, key: jax.Array,
                 example: dict, class_tokens: tuple, config: Any, mesh: Any) -> TrainState:
    """Fresh parameters (replicated on ``mesh``) for inputs shaped like ``example`` (one row of
    the training arrays) and ``class_tokens``."""
    return population.take(create_states(model, tx, key[None], example, class_tokens, [config],
                                         mesh), 0)


def create_states(model: TwoTower, tx: optax.GradientTransformation, keys: jax.Array,
                  example: dict, class_tokens: tuple, configs: Sequence[Any],
                  mesh: Any) -> TrainState:
    """Fresh states of M runs of one model shape, every leaf [M, ...] (replicated on ``mesh``):
    one init, traced once and vmapped over ``keys`` [M] (threefry keys draw under vmap what each
    draws alone), then each run's pretrained tower weights, if its config names any."""
    rep = parallel.replicated(mesh)
    params, batch_stats = jax.jit(jax.vmap(_init_fn(model, example, class_tokens)),
                                  out_shardings=rep,
                                  compiler_options=compiler_options_of(configs[0]))(keys)
    from daug_jax.models.backbones import load_pretrained

    first = population.take(params, 0)
    if load_pretrained(first, configs[0].model, model) is not first:  # checkpoint weights
        params = parallel.replicate(population.stack([
            load_pretrained(population.take(params, m), c.model, model)
            for m, c in enumerate(configs)]), mesh)
    opt_state = jax.jit(jax.vmap(tx.init), out_shardings=rep)(params)
    return TrainState(step=parallel.replicate(jnp.zeros((len(configs),), jnp.int32), mesh),
                      params=params, batch_stats=batch_stats, opt_state=opt_state)


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
        params, opt_state, batch_stats, update = loop.apply_update(
            tx, state.params, state.opt_state, grads, loss, skip_nonfinite=skip_nonfinite,
            project=lambda p: clamp_logit_scale(p, model.max_logit_scale),
            follow=(lambda _: batch_stats, state.batch_stats))
        metrics = {"loss": loss, **parts, **scalars, **update, "lr": schedule(state.step)}
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state)
        return new_state, metrics

    return train_step


def compiler_options_of(config: Any) -> dict | None:
    """XLA options for the compiled programs (``train.compiler_options``), e.g.
    {"xla_backend_optimization_level": 0}: about half the CPU compile time, slower steps."""
    options = config.train.get("compiler_options", None)
    return dict(options) if options else None


