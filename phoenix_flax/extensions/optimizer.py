"""Newton steps for the action bias's offsets (`optimizer.action_bias_offsets="newton"`)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class ActionBiasNewtonState(NamedTuple):
    sum_of_squares: optax.Updates  # per table [rows, cols]: the starting value plus every g^2
    steps: jax.Array  # [] int32
    prior_variance: tuple  # per table (in leaf order) [offset_columns]: the offsets' prior variance, logit^2


# The offsets' prior variance starts at 1 logit^2 and is first fit after an epoch, when every row
# has been looked up (before, the rows' spread is the optimizer's lag, not the posts'); then it
# moves PRIOR_VARIANCE_RATE of the way to its fit each step (an EM step a step, averaged over the
# batches' noise).
PRIOR_VARIANCE_START, PRIOR_VARIANCE_RATE = 1.0, 0.05


def action_bias_newton(
    learning_rate: float,
    step_size: float,
    offset_columns: int,
    impression: float,
    initial_accumulator: float,
    steps_per_epoch: float,
) -> optax.GradientTransformation:
    """For the action bias's post and author tables `[rows, cols]`: Newton steps for the first
    `offset_columns` columns (the per-action offsets), Adagrad's for the rest (affinity factors).

    A row's offset for one action is the bias of a logistic regression on the impressions that look
    the row up. The curvature an impression adds, p(1 - p) times `impression` (the gradient one
    impression's full error gives a row: 1 / (batch x candidates x actions)), is on average its
    squared gradient over `impression`, so F = sum_of_squares / impression^2 is the row's Fisher
    information in impressions and -impression x g / sum_of_squares a Newton step
    (`step_size` of it). The objective is the most probable offsets under N(0, v) per table and
    action: the prior's gradient theta / v and curvature 1 / v count once an epoch, spread over
    the epoch's steps on every row, so that the prior weighs the same after any number of epochs.
    v is fit to the rows (EM): the mean, over the rows looked up so far, of theta^2 plus the
    posterior variance 1 / (F + 1 / v), F per epoch. `sum_of_squares` starts at
    `initial_accumulator` (> 0)."""

    def init(params):
        return ActionBiasNewtonState(
            sum_of_squares=jax.tree.map(lambda p: jnp.full_like(p, initial_accumulator), params),
            steps=jnp.zeros([], jnp.int32),
            prior_variance=tuple(
                jnp.full([offset_columns], PRIOR_VARIANCE_START, p.dtype) for p in jax.tree.leaves(params)
            ),
        )

    def update(updates, state, params):
        steps = state.steps + 1
        epochs = jnp.maximum(steps / steps_per_epoch, 1.0)
        sums = jax.tree.map(lambda s, g: s + g * g, state.sum_of_squares, updates)
        grads, treedef = jax.tree.flatten(updates)
        new_updates, variances = [], []
        for g, s, theta, v in zip(
            grads, treedef.flatten_up_to(sums), treedef.flatten_up_to(params), state.prior_variance, strict=True
        ):
            o = offset_columns
            g_o, s_o, theta_o = g[:, :o], s[:, :o], theta[:, :o]  # the offsets; the rest are factors
            prior = impression * theta_o / (v * steps_per_epoch)  # a step's share of theta / v, in g's units
            curvature = s_o + steps * impression**2 / (v * steps_per_epoch)  # the data's and the prior's so far
            newton = -step_size * impression * (g_o + prior) / curvature
            new_updates.append(jnp.concatenate([newton, -learning_rate * g[:, o:] / jnp.sqrt(s[:, o:])], axis=1))
            seen = (s_o > initial_accumulator).any(-1, keepdims=True)  # [rows, 1]
            information = (s_o - initial_accumulator) / impression**2 / epochs
            fit = jnp.where(seen, theta_o**2 + 1 / (information + 1 / v), 0).sum(0) / jnp.maximum(seen.sum(), 1)
            variances.append(jnp.where(steps >= steps_per_epoch, v + PRIOR_VARIANCE_RATE * (fit - v), v))
        return treedef.unflatten(new_updates), ActionBiasNewtonState(sums, steps, tuple(variances))

    return optax.GradientTransformation(init, update)
