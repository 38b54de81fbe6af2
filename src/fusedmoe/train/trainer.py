"""The compiled training step: the learning-rate schedule, the optimizer, and the
:class:`Trainer` that holds a model's graph and its jitted step.

A run's state is ``{"params": pure dict, "opt_state": optax state}``: plain
pytrees, so they checkpoint and convert (fused <-> unfused) without Flax in the
way (:mod:`fusedmoe.checkpoint.run_checkpoint`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fusedmoe.model import ModelConfig
    from fusedmoe.train.config import TrainConfig


def make_schedule(c: TrainConfig):
    """The optax schedule of ``c``: linear warm-up from 0 to ``learning_rate`` over
    ``warmup_steps``, then cosine decay to ``learning_rate * min_lr_ratio`` at ``steps``."""
    import optax

    decay = max(c.steps, c.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=c.learning_rate, warmup_steps=c.warmup_steps,
        decay_steps=decay, end_value=c.learning_rate * c.min_lr_ratio,
    )


def learning_rates(c: TrainConfig) -> np.ndarray:
    """``[steps]`` float32: the learning rate of step ``s`` (counting from 1) is
    entry ``s - 1``. Computed once per run, so the step takes it as an argument."""
    return np.asarray(make_schedule(c)(np.arange(c.steps)), np.float32)


def make_optimizer(*, grad_clip: float, adam_b1: float, adam_b2: float, weight_decay: float):
    """AdamW without its learning-rate scaling: the step multiplies the update by
    ``-learning_rate``, passed in at run time so one compiled step serves every
    schedule (``optax.adamw`` is this chain followed by that scaling). Weight decay
    applies to matrices only (parameters of rank >= 2)."""
    import jax
    import optax

    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.scale_by_adam(b1=adam_b1, b2=adam_b2),
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
    )


def trainer_for(config: TrainConfig) -> Trainer:
    """The :class:`Trainer` of ``config``'s model and optimizer settings, built once
    per process: runs that differ only in steps, seed, schedule, batch shape or
    checkpointing share one compiled step (compiling takes seconds, a tiny step
    milliseconds)."""
    return _cached_trainer(config.model, config.grad_clip, config.adam_b1, config.adam_b2,
                           config.weight_decay)


# A few entries are plenty (a run uses one trainer, `train --compare` two); each
# holds compiled programs, so the cache is bounded rather than growing forever.
@functools.lru_cache(maxsize=8)
def _cached_trainer(model: ModelConfig, grad_clip: float, adam_b1: float, adam_b2: float,
                    weight_decay: float) -> Trainer:
    return Trainer(model, make_optimizer(grad_clip=grad_clip, adam_b1=adam_b1, adam_b2=adam_b2,
                                         weight_decay=weight_decay))


class Trainer:
    """One model's graph, an optimizer and the jitted training step.

    ``model_class(model_config, rngs=nnx.Rngs)`` builds the model (default
    :class:`fusedmoe.model.MoEModel`); calling it on tokens ``[B, S]`` returns
    ``(logits [B, S, V], aux)`` with ``aux["aux_loss"]`` (added to the loss),
    ``aux["load_balance_loss"] [L_moe]`` and ``aux["tokens_per_expert"] [L_moe, G]``.
    Its state must be parameters only. ``tx`` is an optax transformation whose
    update the step scales by ``-lr`` (see :func:`make_optimizer`).

    :meth:`init_state` starts from fresh parameters of a seed; :meth:`state_for`
    from a parameter tree of the caller's.
    """

    def __init__(self, model_config: Any, tx: Any,
                 model_class: Callable[..., Any] | None = None):
        import jax
        from flax import nnx

        from fusedmoe.model import MoEModel

        self.model_config = model_config
        self.model_class = MoEModel if model_class is None else model_class
        self.tx = tx
        abstract = nnx.eval_shape(lambda: self.model_class(model_config, rngs=nnx.Rngs(0)))
        self.graphdef, _, abstract_rest = nnx.split(abstract, nnx.Param, ...)
        if jax.tree.leaves(abstract_rest.to_pure_dict()):
            raise ValueError("model: has non-parameter state the trainer does not update")
        self.step = jax.jit(_make_step(self.graphdef, tx))
        self._init = jax.jit(self._init_fn)
        self._opt_init = jax.jit(tx.init)

    def init_state(self, seed: int) -> dict[str, Any]:
        """Fresh parameters of ``seed`` and the optimizer state (one compiled call:
        initialising eagerly compiles every random op separately)."""
        import jax

        return self._init(jax.random.key(seed))

    def state_for(self, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` (a pure dict shaped like the model's parameters) with a fresh
        optimizer state."""
        return {"params": params, "opt_state": self._opt_init(params)}

    def abstract_state(self) -> dict[str, Any]:
        """The state's shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), computed
        without allocating it: the target a checkpoint is restored into."""
        import jax

        return jax.eval_shape(self._init_fn, jax.random.key(0))

    def _init_fn(self, key) -> dict[str, Any]:
        from flax import nnx

        model = self.model_class(self.model_config, rngs=nnx.Rngs(key))
        params = nnx.state(model, nnx.Param).to_pure_dict()
        return {"params": params, "opt_state": self.tx.init(params)}


def _make_step(graphdef, tx) -> Callable:
    """``step(params, opt_state, inputs [B, S], targets [B, S], lr) -> (params,
    opt_state, metrics)``: one optimizer step on the cross-entropy plus the
    model's auxiliary loss."""
    import jax
    import optax
    from flax import nnx

    from fusedmoe.model import cross_entropy

    def loss_fn(params, inputs, targets):
        model = nnx.merge(graphdef, nnx.State(params))
        logits, aux = model(inputs)
        ce = cross_entropy(logits, targets)
        return ce + aux["aux_loss"], (ce, aux)

    def step(params, opt_state, inputs, targets, lr):
        (loss, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), params, updates)
        metrics = {
            "loss": loss, "ce_loss": ce, "aux_loss": aux["aux_loss"],
            "load_balance_loss": aux["load_balance_loss"],
            "grad_norm": optax.global_norm(grads),
            "tokens_per_expert": aux["tokens_per_expert"],
        }
        return params, opt_state, metrics

    return step
