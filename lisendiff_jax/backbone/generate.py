"""Batched text generation with a KV cache: one jitted prefill, then a `lax.while_loop`.

The whole loop runs on the device; it stops when every row has produced an end-of-sequence
token or `max_new_tokens` have been made. Prompts are left-padded so that all rows share
the cache slot they write next.

Every row samples from its own key: the token at step s of row i is drawn with
fold_in(keys[i], s), so a row's continuation does not depend on which rows share its batch.

A `TokenHook` sees each step's tokens while the loop runs (a server streams them) and may stop
rows (a client that left); the other rows' tokens do not change.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lisendiff_jax.backbone.model import Decoder, KVCache

# The token buffers and KV cache hold max_new_tokens rounded up to a multiple of this, and
# max_new_tokens, temperature and top_p enter the compiled loop as values, not constants: a
# server whose clients each send their own settings then compiles once per batch and prompt
# shape, not once per setting (each compile takes seconds; minutes for a large model).
TOKEN_BLOCK = 64


class SamplingLayout(NamedTuple):
    """What the compiled decoding loop's shapes and constants depend on (a static argument)."""

    capacity: int  # token slots: max_new_tokens rounded up to a multiple of TOKEN_BLOCK
    eos_token_ids: tuple[int, ...]
    pad_token_id: int


class SamplingValues(NamedTuple):
    """The settings the compiled loop reads as values, shared by every row of the batch."""

    max_new_tokens: jax.Array  # [] int32, at most the layout's capacity
    temperature: jax.Array  # [] float32; 0 is greedy
    top_p: jax.Array  # [] float32 in (0, 1]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How each next token is chosen. temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def split(self) -> tuple[SamplingLayout, SamplingValues]:
        """The static layout and the traced values `decode` takes."""
        capacity = -(-self.max_new_tokens // TOKEN_BLOCK) * TOKEN_BLOCK
        values = SamplingValues(
            np.int32(self.max_new_tokens), np.float32(self.temperature), np.float32(self.top_p)
        )
        return SamplingLayout(capacity, tuple(self.eos_token_ids), self.pad_token_id), values


class Generation(NamedTuple):
    # [batch, capacity] int32 from `decode` (`generate` cuts it to max_new_tokens), with
    # pad_token_id after each row's EOS and past max_new_tokens
    tokens: jax.Array
    lengths: jax.Array  # [batch] int32, tokens produced per row (its EOS included)


def _top_p_filter(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """-inf outside the smallest set of tokens whose probability reaches top_p (the first
    always kept)."""
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
    cutoff = jnp.min(kept, axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def sample_next(logits: jax.Array, keys: jax.Array, values: SamplingValues) -> jax.Array:
    """Next token ids [batch] from float32 logits [batch, vocab]: greedy, or top-p sampling
    with row i drawn from keys[i] ([batch] keys) alone."""

    # Conditionals, not selects: the batch shares its settings, so only the branch taken runs
    # (top_p 1 sorts nothing, greedy draws nothing).
    def drawn(logits: jax.Array) -> jax.Array:
        logits = logits / values.temperature
        logits = jax.lax.cond(
            values.top_p < 1.0, _top_p_filter, lambda x, _: x, logits, values.top_p
        )
        return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)

    def greedy(logits: jax.Array) -> jax.Array:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(values.temperature == 0.0, greedy, drawn, logits)


# (tokens [batch] int32, live [batch] bool: the rows that drew theirs this step, i.e. were not
# done before it) -> [batch] bool: rows to stop, done from then on. Called under jit once per
# step, in order (each call's result feeds the next step).
TokenHook = Callable[[jax.Array, jax.Array], jax.Array]


class _LoopState(NamedTuple):
    step: jax.Array  # [] int32: tokens written so far
    tokens: jax.Array  # [batch, capacity]
    last: jax.Array  # [batch]: the token to feed next
    done: jax.Array  # [batch] bool
    cache: KVCache


def decode(
    model: Decoder,
    input_ids: jax.Array,  # [batch, prompt] int32, left-padded
    attention_mask: jax.Array,  # [batch, prompt], 0 on padding
    keys: jax.Array,  # [batch] PRNG keys, one per row
    layout: SamplingLayout,
    values: SamplingValues,
    forward_kwargs: dict | None = None,
    on_tokens: TokenHook | None = None,
) -> Generation:
    """Prefill and decode loop as a pure function of the model; call it under jit.

    `forward_kwargs` are passed to every model call (the LisenDiff model uses them for its
    latents); the plain backbone takes none. `on_tokens` sees every step's tokens; a row it
    stops gets pad tokens from the next step on, and its length is then no reply's.
    """
    chex.assert_rank(input_ids, 2)
    chex.assert_equal_shape([input_ids, attention_mask])
    chex.assert_shape(keys, (input_ids.shape[0],))
    forward_kwargs = forward_kwargs or {}
    batch, prompt_len = input_ids.shape
    eos = jnp.asarray(layout.eos_token_ids or (-1,), jnp.int32)
    pad = layout.pad_token_id
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))  # (keys, step) -> [batch]

    cache = model.init_cache(batch, prompt_len + layout.capacity)
    logits, cache = model.forward(input_ids, attention_mask, cache=cache, **forward_kwargs)
    first = sample_next(logits[:, -1], step_keys(keys, 0), values)
    tokens = jnp.full((batch, layout.capacity), pad, jnp.int32)
    done = jnp.isin(first, eos)
    if on_tokens is not None:
        done = done | on_tokens(first, jnp.ones((batch,), bool))
    state = _LoopState(
        step=jnp.ones((), jnp.int32),
        tokens=tokens.at[:, 0].set(first),
        last=first,
        done=done,
        cache=cache,
    )

    def keep_going(s: _LoopState) -> jax.Array:
        return (s.step < values.max_new_tokens) & ~jnp.all(s.done)

    def step(s: _LoopState) -> _LoopState:
        ones = jnp.ones((batch, 1), jnp.int32)
        logits, cache = model.forward(s.last[:, None], ones, cache=s.cache, **forward_kwargs)
        drawn = sample_next(logits[:, -1], step_keys(keys, s.step), values)
        nxt = jnp.where(s.done, pad, drawn)
        done = s.done | jnp.isin(nxt, eos)
        if on_tokens is not None:
            done = done | on_tokens(nxt, ~s.done)
        return _LoopState(
            step=s.step + 1,
            tokens=jax.lax.dynamic_update_slice(s.tokens, nxt[:, None], (0, s.step)),
            last=nxt,
            done=done,
            cache=cache,
        )

    final = jax.lax.while_loop(keep_going, step, state)
    produced = jnp.arange(layout.capacity)[None, :] < final.step
    is_eos = jnp.isin(final.tokens, eos) & produced
    # A row's length runs to its first EOS (inclusive), or to the last step taken.
    first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, final.step)
    return Generation(tokens=final.tokens, lengths=first_eos.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("graphdef", "layout"))
def _decode_jit(graphdef, state, input_ids, attention_mask, keys, layout, values):
    return decode(nnx.merge(graphdef, state), input_ids, attention_mask, keys, layout, values)


def generate(
    model: Decoder,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    params: SamplingParams | None = None,
    rng: jax.Array | None = None,
) -> Generation:
    """Generates continuations of left-padded prompts [batch, prompt] with the backbone.

    `rng` is one key per row ([batch]), or one key for all, from which row i gets
    fold_in(rng, i); default key(0). EOS ids default to the checkpoint's. Compiled once per
    (shapes, EOS and pad ids, max_new_tokens rounded up to a multiple of TOKEN_BLOCK).
    """
    params = params or SamplingParams(eos_token_ids=model.config.eos_token_ids)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    rng = jax.random.key(0) if rng is None else rng
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)  # a raw uint32 key from jax.random.PRNGKey
    if rng.ndim == 0:
        rng = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(len(input_ids)))
    graphdef, state = nnx.split(model)
    out = _decode_jit(
        graphdef, state, input_ids, jnp.asarray(attention_mask, jnp.int32), rng, *params.split()
    )
    return out._replace(tokens=out.tokens[:, : params.max_new_tokens])
