"""What ``daug-jax bench`` runs and how much work it is: the train steps compiled exactly as
training compiles them, the reference matmul, and two FLOP counts of a program — XLA's cost
analysis (`xla_flops`, every operation) and the matrix products and convolutions of its jaxpr
(`matmul_flops`, the count a peer framework's FLOP counter makes).

The step builders (`unet_step`, `towers_step`) are also what the data-parallel tests run.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from daug_jax import parallel
from daug_jax.data import synthetic
from daug_jax.data.pipeline import ArraySource
from daug_jax.losses import labels_and_mask


# ----------------------------------------------------------------------------- step builders
def unet_step(config: Any, images: np.ndarray, *, classifier_labels: np.ndarray | None = None,
              init_config: Any | None = None, key_seed: int = 1) -> tuple[Callable, Callable, ArraySource]:
    """``(step(state, batch), init_state(mesh), source)`` for the diffusion config's UNet.

    images: [N, H, W, C] float32 in [0, 1].  With ``classifier_labels`` ([N, K] int in {-1, 0, 1})
    the noise-aware classifier's step instead.  ``init_config`` (default ``config``) builds the
    module that initialises the parameters: parameters are float32 whatever the compute dtype,
    so a float32 config can initialise a bfloat16 run.
    """
    from daug_jax.diffusion import train as dtrain

    classifier = classifier_labels is not None

    def build(cfg):
        if classifier:
            return (dtrain.make_classifier(cfg, classifier_labels.shape[1]),
                    dtrain.make_optimizer(cfg.classifier_train))
        return dtrain.make_unet(cfg), dtrain.make_optimizer(cfg.unet_train)

    module, tx = build(config)
    init_module, init_tx = build(init_config or config)
    # Keys of the implementation training uses: the random stream (and, for some
    # implementations, how it is split across devices) is part of what is measured and tested.
    alpha_bar, key = dtrain.alpha_bar_of(config), dtrain.prng_key(key_seed)
    if classifier:
        step_fn = dtrain.classifier_step_fn(module, tx, alpha_bar, dtrain.trained_max_level(config))
        labels, mask = labels_and_mask(np.asarray(classifier_labels, np.float32))
        source = ArraySource({"image": images, "labels": labels, "label_mask": mask})
    else:
        step_fn = dtrain.diffusion_step_fn(module, tx, alpha_bar, config.unet_train.ema_decay)
        source = ArraySource({"image": images})
    # One compiled program instead of one dispatch per initialiser.
    init = jax.jit(dtrain.init_state, static_argnums=(0, 1, 2), static_argnames="ema")

    def init_state(mesh):
        state = init(init_module, init_tx, tuple(images.shape[1:]), dtrain.prng_key(0),
                     ema=not classifier)
        return parallel.replicate(state, mesh)

    # The key is a constant of the program: identical on every process, no transfer needed.
    return (lambda state, batch: step_fn(state, batch, key)), init_state, source


def towers_step(config: Any, data: dict, workdir: str, *,
                init_config: Any | None = None) -> tuple[Callable, Callable, ArraySource]:
    """``(step(state, batch), init_state(mesh), source)`` for the two towers, as `train_towers` builds them.

    data: records like `synthetic.generate` output; workdir: where the learnt tokenizer is saved
    (and reloaded from, if there).  ``init_config`` as in `unet_step`.
    """
    return towers_parts(config, data, workdir, init_config=init_config)[:3]


def towers_parts(config: Any, data: dict, workdir: str, *,
                 init_config: Any | None = None) -> tuple[Callable, Callable, ArraySource, tuple, int]:
    """`towers_step`'s three parts plus what a peer needs to build the same step: the class
    prompts' tokens ``(ids, mask)`` [K, L] and the vocabulary size."""
    from daug_jax import tower_inputs
    from daug_jax import train as ttrain
    from daug_jax.models.two_tower import build_two_tower, class_prompt_tokens

    init_config = init_config or config
    text_cfg = config.model.text
    source = ArraySource({k: data[k] for k in ("image", "labels", "report", "id")})
    reader = tower_inputs.make_reader(config, source, synthetic.CLASS_NAMES)
    tokenizer = tower_inputs.make_tokenizer(text_cfg, tower_inputs.report_corpus(reader), workdir)
    arrays = tower_inputs.tower_batch(config, tokenizer, reader(range(len(source))))
    class_tokens = tuple(jnp.asarray(a) for a in class_prompt_tokens(
        tokenizer, config.model.class_names, config.model))
    bert = ttrain.bert_config(text_cfg, len(tokenizer))
    model = build_two_tower(config.model, bert)
    init_model = build_two_tower(init_config.model, bert)
    tx, schedule = ttrain.make_optimizer(config.train)
    init_key, step_key = jax.random.split(
        jax.random.key(int(config.train.seed), impl=config.train.prng_impl))
    train_step = ttrain.make_train_step(model, tx, schedule,
                                        prompts=config.model.get("prompts", "single"))
    consts = ttrain.step_constants(class_tokens, config, step_key)
    step_fn = lambda state, batch: train_step(state, batch, consts)  # noqa: E731
    example = {k: v[:1] for k, v in arrays.items()}

    def init_state(mesh):
        return ttrain.create_state(init_model, tx, init_key, example, class_tokens, init_config,
                                   mesh)

    class_arrays = tuple(np.asarray(a) for a in class_tokens)
    return step_fn, init_state, ArraySource(arrays), class_arrays, len(tokenizer)


def compile_step(step_fn: Callable, state: Any, batch: dict, mesh) -> Any:
    """``jit(step_fn)`` with training's shardings (state replicated and donated), compiled."""
    rep = parallel.replicated(mesh)
    spec = {k: parallel.data_sharding(mesh) for k in batch}
    return jax.jit(step_fn, in_shardings=(rep, spec), out_shardings=(rep, rep),
                   donate_argnums=0).lower(state, batch).compile()


# ----------------------------------------------------------------------------- FLOPs
def xla_flops(compiled: Any) -> float:
    """FLOPs of one call of a compiled program (per device for a partitioned one), from XLA."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0]
    flops = float((cost or {}).get("flops", 0.0))
    if flops <= 0:
        raise RuntimeError(f"XLA's cost analysis reports no FLOPs on {jax.default_backend()}")
    return flops


def matmul_flops(fn: Callable, *args) -> float:
    """FLOPs of the matrix products and convolutions in ``fn(*args)``'s program: 2 x the
    multiply-adds of every ``dot_general`` and ``conv_general_dilated`` in its jaxpr, loops
    counted once per trip.  The count a peer framework's FLOP counter makes (PyTorch's
    `FlopCounterMode` counts the same operations), unlike XLA's cost analysis, which also
    counts elementwise work.
    """
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            (lhs_contract, _), (lhs_batch, _) = params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            contracted = np.prod([lhs[d] for d in lhs_contract], dtype=np.float64)
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape, dtype=np.float64) * contracted
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
            per_output = rhs[spec[1]] * np.prod([rhs[d] for d in spec[2:]], dtype=np.float64)
            # The input gradient of a strided convolution is a convolution of the cotangent
            # dilated by the stride: only 1 / prod(dilation) of its taps meet non-zero inputs.
            per_output /= np.prod(params["lhs_dilation"], dtype=np.float64)
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape, dtype=np.float64) * per_output
        trips = params.get("length", 1) if name == "scan" else 1
        for value in params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += trips * _jaxpr_flops(inner)
    return total


def matmul_program(n: int, dtype: str = "float32") -> tuple[Callable[[], Any], float, float]:
    """``(call, flops, xla_flops)``: one n x n matmul (2 n^3 FLOPs) on fixed operands of ``dtype``
    (float32; bfloat16, the accelerators' rate the paper-scale steps are compared with)."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    compiled = jax.jit(jnp.matmul).lower(a, b).compile()
    return (lambda: compiled(a, b)), 2.0 * n ** 3, xla_flops(compiled)
