"""The Llama / Qwen2 decoder in Flax NNX.

Submodules carry the names of their transformers counterparts (`self_attn.q_proj`,
`input_layernorm`, ...) so that checkpoint keys map onto our parameter paths by rule.
Parameters are stored in `param_dtype` and computed in `dtype`; attention softmax and logits
are always float32.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from lisendiff_jax.backbone.config import BackboneConfig
from lisendiff_jax.backbone.layout import PROJECTIONS, constrain
from lisendiff_jax.backbone.rope import apply_rotary, inverse_frequencies, rotary_tables

# The names `checkpoint_name` gives the attention projections' outputs, for "attention".
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

# Rematerialisation policies for training: what each decoder layer keeps for the backward pass.
# "attention" keeps the q/k/v/o projections' outputs (3-4 values per hidden unit and token
# with GQA) and recomputes the norms, the attention scores and the MLP, whose three products
# are the widest (intermediate_size) and so the costliest to keep.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attention": jax.checkpoint_policies.save_only_these_names(*ATTENTION_PROJECTIONS),
}

# Self-attention kernels (`Decoder.attention`). "einsum" is the reference, written out in
# `Attention.__call__`; "xla" is jax.nn.dot_product_attention's XLA path (the same products
# and mask value, so it checks the call that "cudnn" makes); "cudnn" is cuDNN's fused flash
# attention (NVIDIA GPU, bf16/fp16), which never stores the [batch, heads, seq, keys] scores.
# "auto" takes cudnn where it applies (and a small probe call of it, forward and backward, runs)
# and einsum elsewhere, an odd sequence length included (cuDNN's masked attention refuses to
# differentiate one, and a trace cannot tell whether it will be differentiated):
# on a CPU both other kernels run the same products, and einsum was no slower there
# (benchmarks/README.md). Decoding with a KV cache always runs einsum: one query per step,
# nothing for flash attention to save.
ATTENTION_KERNELS = ("auto", "einsum", "xla", "cudnn")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def _on_cuda() -> bool:
    """Whether traced computations are for an NVIDIA GPU: the devices of the mesh set with
    `jax.set_mesh`, if one is (a GPU topology's when compiling ahead of time on a machine
    without that GPU), else the default device."""
    mesh = jax.sharding.get_abstract_mesh()  # the concrete mesh cannot be asked inside a trace
    device = mesh.abstract_device if not mesh.empty and mesh.abstract_device else jax.devices()[0]
    return device.platform == "gpu" and "nvidia" in device.device_kind.lower()


@functools.cache
def _cudnn_runs(dtype: jnp.dtype) -> bool:
    """Whether cuDNN's fused attention compiles and runs here, forward and backward, with a
    boolean mask like ours.

    "auto" asks before choosing it, so that a GPU, driver or cuDNN without a usable kernel
    falls back to the einsum reference instead of failing inside the first train step.
    """
    if not _on_cuda():
        return False

    def attend(q: jax.Array, mask: jax.Array) -> jax.Array:
        out = jax.nn.dot_product_attention(q, q, q, mask=mask, implementation="cudnn")
        return jnp.sum(out.astype(jnp.float32))

    try:
        fn = jax.jit(jax.value_and_grad(attend))
        # Asked while a train step is being traced: run the probe now, not in that trace.
        with jax.ensure_compile_time_eval():
            q = jnp.ones((1, 128, 2, 64), dtype)  # [batch, seq, heads, head_dim]
            mask = jnp.tril(jnp.ones((128, 128), jnp.bool_))[None, None]
            jax.block_until_ready(fn(q, mask))
    except Exception:  # any failure to lower, compile or run means: not here
        return False
    return True


def attention_kernel(setting: str, dtype: jnp.dtype, length: int) -> str:
    """The kernel an `ATTENTION_KERNELS` setting runs here for activations of `dtype` on
    sequences of `length` tokens."""
    if setting not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {setting!r}: expected one of {ATTENTION_KERNELS}")
    cuda = _on_cuda()
    if setting == "auto":
        usable = cuda and dtype in _CUDNN_DTYPES and length % 2 == 0
        return "cudnn" if usable and _cudnn_runs(jnp.dtype(dtype)) else "einsum"
    if setting == "cudnn" and not (cuda and dtype in _CUDNN_DTYPES):
        raise ValueError(
            f"attention kernel 'cudnn' needs an NVIDIA GPU and bfloat16/float16 activations; "
            f"here: {jax.devices()[0].platform}, {jnp.dtype(dtype).name} (use 'auto' or 'einsum')"
        )
    return setting


# The score of a masked key: far below any real score, yet finite, so that a row with no
# allowed key (a padded query) gives uniform weights rather than NaN.
MASKED_SCORE = -0.7 * float(jnp.finfo(jnp.float32).max)


@struct.dataclass
class KVCache:
    """Keys and values of every layer for slots [0, end), written left to right.

    A batch of left-padded prompts shares the slot index; `key_mask` marks which slots hold
    real tokens and `next_position` is each row's next rotary position.
    """

    keys: tuple[jax.Array, ...]  # per layer [batch, max_len, kv_heads, head_dim]
    values: tuple[jax.Array, ...]  # per layer [batch, max_len, kv_heads, head_dim]
    key_mask: jax.Array  # [batch, max_len] bool
    end: jax.Array  # [] int32
    next_position: jax.Array  # [batch] int32

    @property
    def max_len(self) -> int:
        return self.key_mask.shape[1]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype: jnp.dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in float32 and cast back before scaling, as transformers does.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


def _linear(
    d_in: int, d_out: int, bias: bool, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs
) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary positions and an optional KV cache."""

    def __init__(
        self, cfg: BackboneConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = _linear(cfg.hidden_size, q_dim, cfg.qkv_bias, dtype, param_dtype, rngs)
        self.k_proj = _linear(cfg.hidden_size, kv_dim, cfg.qkv_bias, dtype, param_dtype, rngs)
        self.v_proj = _linear(cfg.hidden_size, kv_dim, cfg.qkv_bias, dtype, param_dtype, rngs)
        self.o_proj = _linear(q_dim, cfg.hidden_size, cfg.o_bias, dtype, param_dtype, rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.kernel = "auto"  # an ATTENTION_KERNELS setting, set through Decoder.attention

    def __call__(
        self,
        x: jax.Array,  # [batch, seq, hidden]
        cos: jax.Array,  # [batch, seq, head_dim]
        sin: jax.Array,
        allowed: jax.Array,  # [batch, seq, keys] bool
        kv: tuple[jax.Array, jax.Array] | None,  # cache [batch, max_len, kv_heads, head_dim]
        end: jax.Array | int,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        b, t, _ = x.shape
        # Named for the "attention" remat policy (REMAT_POLICIES).
        q = checkpoint_name(self.q_proj(x), "q_proj").reshape(b, t, self.num_heads, self.head_dim)
        k = checkpoint_name(self.k_proj(x), "k_proj")
        v = checkpoint_name(self.v_proj(x), "v_proj")
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        kernel = "einsum"
        if kv is not None:
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, end, 0, 0))
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, end, 0, 0))
            kv = (k, v)
        else:
            kernel = attention_kernel(self.kernel, q.dtype, t)
        if kernel != "einsum":
            # Same layout ([batch, seq, heads, head_dim], query head h reads kv head
            # h // group), scale and masked score (-0.7 x the float32 maximum) as below.
            out = jax.nn.dot_product_attention(
                q, k, v, mask=allowed[:, None], implementation=kernel
            ).reshape(b, t, -1)
            return checkpoint_name(self.o_proj(out), "o_proj"), kv
        # Query head h reads kv head h // group, matching transformers' repeat_kv layout.
        group = self.num_heads // self.num_kv_heads
        q = q.reshape(b, t, self.num_kv_heads, group, self.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(allowed[:, None, None], scores * self.head_dim**-0.5, MASKED_SCORE)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, -1)
        return checkpoint_name(self.o_proj(out), "o_proj"), kv


class MLP(nnx.Module):
    def __init__(
        self, cfg: BackboneConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        h, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = _linear(h, i, bias, dtype, param_dtype, rngs)
        self.up_proj = _linear(h, i, bias, dtype, param_dtype, rngs)
        self.down_proj = _linear(i, h, bias, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm self-attention and MLP blocks.

    `cross_attn` is None in a plain backbone; LisenDiff attaches a module there that lets the
    hidden states attend to a latent set after self-attention.
    """

    def __init__(
        self, cfg: BackboneConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, **kw)
        # nnx.data: a slot that is None now but may hold a module (with parameters) later.
        self.cross_attn: nnx.Module | None = nnx.data(None)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype
        )
        self.mlp = MLP(cfg, **kw)

    def __call__(
        self, x, cos, sin, allowed, kv, end, latents=None, latent_mask=None, segment_ids=None
    ):
        attn_out, kv = self.self_attn(self.input_layernorm(x), cos, sin, allowed, kv, end)
        x = x + attn_out
        if self.cross_attn is not None and latents is not None:
            x = x + self.cross_attn(x, latents, latent_mask, segment_ids)
        return x + self.mlp(self.post_attention_layernorm(x)), kv


def projection_slots(layer: DecoderLayer) -> list[tuple[nnx.Module, str]]:
    """(block, attribute name) of each of a decoder layer's `PROJECTIONS`: where code that
    swaps a projection's module (LoRA, quantization) finds and sets it."""
    return [(getattr(layer, block), name) for name, (block, *_) in PROJECTIONS.items()]


def _call_layer(layer: DecoderLayer, *args):
    return layer(*args)


def _rematerialised(policy):
    """`_call_layer` under jax.checkpoint, on the layer's state as a plain pytree.

    nnx.remat would write the layer's state back after the call, which NNX refuses when the
    layer was merged at an outer trace level (as the frozen weights of a train step are).
    A layer's call changes no state worth keeping (dropout streams are refreshed every
    step), so the pure form loses nothing.
    """

    def call(layer: DecoderLayer, *args):
        graphdef, state = nnx.split(layer)

        def pure(state, *args):
            return nnx.merge(graphdef, state)(*args)

        return jax.checkpoint(pure, policy=policy)(state, *args)

    return call


class Decoder(nnx.Module):
    """A causal language model: `model(input_ids)` gives float32 logits [batch, seq, vocab]."""

    def __init__(
        self,
        config: BackboneConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        # Set by training (see REMAT_POLICIES); inference never rematerialises.
        self.remat = "none"
        self._attention = "auto"
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, **kw)
        self.layers = nnx.List([DecoderLayer(config, **kw) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Linear(
                config.hidden_size,
                config.vocab_size,
                use_bias=False,
                preferred_element_type=jnp.float32,
                **kw,
            )

    @property
    def attention(self) -> str:
        """The self-attention kernel of every layer (ATTENTION_KERNELS); "auto" unless set."""
        return self._attention

    @attention.setter
    def attention(self, kernel: str) -> None:
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel {kernel!r}: expected one of {ATTENTION_KERNELS}")
        self._attention = kernel
        for layer in self.layers:
            layer.self_attn.kernel = kernel

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        latents: jax.Array | None = None,
        latent_mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        logits, _ = self.forward(
            input_ids,
            attention_mask,
            positions=positions,
            latents=latents,
            latent_mask=latent_mask,
            segment_ids=segment_ids,
        )
        return logits

    def forward(
        self,
        input_ids: jax.Array,  # [batch, seq] int32
        attention_mask: jax.Array | None = None,  # [batch, seq], 0 on (left) padding
        *,
        positions: jax.Array | None = None,  # [batch, seq] int32
        cache: KVCache | None = None,
        latents: jax.Array | None = None,  # [batch, L, d_latent], for attached cross-attention
        latent_mask: jax.Array | None = None,  # [batch, L]
        segment_ids: jax.Array | None = None,  # [batch, seq] int32, packed rows (0 = padding)
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits [batch, seq, vocab] (float32) and, when given a cache, the updated cache."""
        hidden, cache = self.hidden_states(
            input_ids,
            attention_mask,
            positions=positions,
            cache=cache,
            latents=latents,
            latent_mask=latent_mask,
            segment_ids=segment_ids,
        )
        return self.logits(hidden), cache

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        latents: jax.Array | None = None,
        latent_mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """The final-norm hidden states [batch, seq, hidden], before the LM head.

        `segment_ids` [batch, seq] int32 marks packed rows: several examples one after
        another, numbered 1, 2, ... (0 on padding). Each token then attends causally within
        its own segment only, and reads its own segment's latents (packed `latents` [batch,
        K, L, d], see `CrossAttention`); `positions`, which restart at every segment, must
        come with them. Training only: no cache.
        """
        chex.assert_rank(input_ids, 2)
        b, t = input_ids.shape
        mask = (
            jnp.ones((b, t), jnp.bool_)
            if attention_mask is None
            else attention_mask.astype(jnp.bool_)
        )
        chex.assert_shape(mask, (b, t))
        if segment_ids is not None:
            if cache is not None or positions is None:
                raise ValueError("segment_ids (packed rows) need positions and take no cache")
            chex.assert_shape(segment_ids, (b, t))
        start = 0 if cache is None else cache.next_position[:, None]
        if positions is None:
            positions = jnp.maximum(start + jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
        cos, sin = rotary_tables(
            positions, inverse_frequencies(self.config.head_dim, self.config.rope)
        )

        if cache is None:
            end, key_mask = 0, mask
        else:
            end = cache.end
            key_mask = jax.lax.dynamic_update_slice(cache.key_mask, mask, (0, end))
        query_slots = end + jnp.arange(t)
        key_slots = jnp.arange(key_mask.shape[1])
        allowed = (key_slots[None, :] <= query_slots[:, None])[None] & key_mask[:, None, :]
        if segment_ids is not None:
            # A padding query (segment 0) keeps the view it has in an unpacked row, so no
            # query is left without a key whatever the attention kernel does with one.
            own = segment_ids[:, :, None] == segment_ids[:, None, :]
            allowed &= own | (segment_ids[:, :, None] == 0)  # [batch, seq, keys]

        x = self.embed_tokens(input_ids)
        call_layer = _call_layer
        if self.remat != "none" and cache is None:
            call_layer = _rematerialised(REMAT_POLICIES[self.remat])
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, kv = call_layer(
                layer, x, cos, sin, allowed, kv, end, latents, latent_mask, segment_ids
            )
            # On a mesh: the residual stream split by rows only, so that FSDP gathers weights
            # rather than activations (a no-op on one device).
            x = constrain(x, ("batch", "length", "act_embed"))
            if kv is not None:
                new_keys.append(kv[0])
                new_values.append(kv[1])
        if cache is not None:
            cache = KVCache(
                keys=tuple(new_keys),
                values=tuple(new_values),
                key_mask=key_mask,
                end=cache.end + t,
                next_position=cache.next_position + mask.sum(axis=1, dtype=jnp.int32),
            )
        return self.norm(x), cache

    def head_matrix(self) -> jax.Array:
        """The LM head's weights [hidden, vocab] (the embedding table's transpose when tied)."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits from hidden states, without an fp32 copy of the head's weights."""
        return jnp.einsum(
            "...d,dv->...v",
            hidden.astype(self.dtype),
            self.head_matrix().astype(self.dtype),
            preferred_element_type=jnp.float32,
        )

    def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype | None = None) -> KVCache:
        """An empty cache for `batch` rows and up to `max_len` tokens per row."""
        cfg = self.config
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        dtype = dtype or self.dtype
        return KVCache(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            key_mask=jnp.zeros((batch, max_len), jnp.bool_),
            end=jnp.zeros((), jnp.int32),
            next_position=jnp.zeros((batch,), jnp.int32),
        )
