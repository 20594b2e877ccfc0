"""Replies from a restored model: encode the context, sample a latent, decode while reading it.

A request is some context turns (oldest first), a style or an empathy dial w (the style is
the dial's ends: default 0, empathy 1), a guidance scale on the context (1: none; other values
need a model trained with context dropout) and a target language. A batch of requests becomes:
1. prompts: each chat rendered with the language's system prompt (the run's: built in, or
   from the prompts file it trained with) and the generation prompt (`encode_chat`), cut
   from the oldest turn to the prompt budget (with a warning), left-padded to a shared
   width (`prompt_width`: a power of two, at least `PAD_MULTIPLE`), so few shapes compile;
2. context embeddings: the newest `data.max_context` turns through the run's S-Encoder, laid
   out as in training (oldest first, padded at the end) - LisenDiff models only;
3. one jitted call: both styles' summaries, the sampler chain mixing both styles' predictions
   at each row's w (`sample_latents`, `sampler.py`), KV-cache decoding
   with the LLM cross-attending to the latent and, for a trace, decoding once more from the
   predicted y0 of each of the last steps, all rows of the trace as one batch.

Each request draws all of its randomness (its latent's noise and every sampled token) from its
own key, so its reply does not depend on the other requests of its batch, nor on the batch
size: request i of a call draws from fold_in(key(options.seed), i), and a request with its own
`seed` draws as the first request of a call with that seed would (a server batching requests
of different clients gives each its seed).

The prompt budget is the run's `data.max_length`, the longest chat the model was trained on.
A prompt and `max_tokens` that together overflow the backbone's positions are an `InputError`
in the request's terms (the prompt's length, the largest `max_tokens` that fits), raised for
every request of a call before the model runs.

A reply or trace row cut by `max_tokens` inside a multi-byte character would end in U+FFFD;
that tail is dropped (`without_cut_character`).

Models without LisenDiff modules (the LoRA-only baseline, a bare backbone) decode from the
prompt alone; their replies carry no latent and no trace.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import warnings
from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import io_callback
from jax.sharding import NamedSharding, PartitionSpec
from transformers import PreTrainedTokenizerBase

from lisendiff_jax.backbone.generate import SamplingParams, decode
from lisendiff_jax.config import system_prompts
from lisendiff_jax.data.encoder import Encoder, make_encoder
from lisendiff_jax.data.example import STYLES
from lisendiff_jax.data.formatting import Encoded, encode_chat, system_prompt
from lisendiff_jax.data.languages import is_language_tag
from lisendiff_jax.errors import UserError
from lisendiff_jax.method.model import LisenDiff
from lisendiff_jax.method.sampler import Plan, SamplerName, make_plan, sample, steered
from lisendiff_jax.sharding import MeshPlan

PAD_MULTIPLE = 32


def prompt_width(longest: int, budget: int) -> int:
    """The padded width of a batch whose longest prompt has `longest` tokens, when no prompt
    has more than `budget`: the next power of two, at least `PAD_MULTIPLE`, at most `budget`
    rounded up to a multiple of it.

    Why powers of two, not multiples of 32: every width is a program to compile for each batch
    size (seconds on a CPU for the tiny model, more for an 8B one), and a server meets prompts
    of every length; doubling widths give log2(budget / 32) + 1 of them (7 for 2048 tokens)
    rather than budget / 32 (64), for at most twice the prompt's tokens in the prefill."""
    cap = -(-budget // PAD_MULTIPLE) * PAD_MULTIPLE
    return min(max(PAD_MULTIPLE, 1 << (longest - 1).bit_length()), cap)


REPLACEMENT = "\ufffd"
MAX_MISSING_BYTES = 3  # a UTF-8 character cut short lacks at most 3 of its (up to) 4 bytes


class InputError(UserError, ValueError):
    """A request the model cannot answer; the message says what to change."""


class ContextTruncatedWarning(UserWarning):
    """The context did not fit the prompt budget and lost its oldest part."""


@dataclasses.dataclass(frozen=True)
class Request:
    context: tuple[str, ...]  # turns, oldest first; the newest is the user's
    style: str = "empathy"
    lang: str = "zh"
    seed: int | None = None  # None: the call's Options.seed and the request's position
    # The empathy dial w: None samples `style`; a float mixes the two styles' predictions,
    # default + w (empathy - default), so 0 is exactly the default style and 1 the empathy one.
    empathy: float | None = None
    # Classifier-free guidance scale on the context (1 = none); other values need a model
    # trained with model.denoiser.context_dropout > 0 (checked by the Listener).
    guidance: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "context", tuple(t.strip() for t in self.context if t.strip()))
        if not self.context:
            raise InputError("empty context: give at least one non-blank turn")
        if self.style not in STYLES:
            raise InputError(f"unknown style {self.style!r}; choose one of {', '.join(STYLES)}")
        for field in ("empathy", "guidance"):
            value = getattr(self, field)
            if value is None and field == "empathy":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"{field} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise InputError(f"{field} must be finite, got {value!r}")
            object.__setattr__(self, field, float(value))
        # Whether the run has a prompt for it is the Listener's to say (`check`).
        if not is_language_tag(self.lang):
            raise InputError(f"lang {self.lang!r} is not a language tag (e.g. 'zh', 'ko')")


@dataclasses.dataclass(frozen=True)
class Options:
    """How latents and tokens are drawn. temperature 0 decodes greedily."""

    seed: int = 0  # for the requests without their own seed
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 64
    sampler: SamplerName = "ddpm"
    ddim_steps: int = 0  # 0 = every step of the schedule
    eta: float = 0.0  # DDIM noise scale
    trace_steps: int = 0  # decode the predicted y0 of this many final steps too


@dataclasses.dataclass(frozen=True)
class TraceStep:
    t: int  # 0-based diffusion step whose y0 prediction was decoded
    text: str


@dataclasses.dataclass(frozen=True)
class Reply:
    text: str
    latent: np.ndarray | None  # [L, d] float32 in the encoder's space; None without LisenDiff
    trace: tuple[TraceStep, ...] = ()
    truncated: bool = False  # the context lost turns or characters to fit the prompt budget


def without_cut_character(text: str) -> str:
    """`text` less the U+FFFD its decoding ends with when the tokens stop inside a multi-byte
    character. Byte-level BPE decodes such a tail to one U+FFFD, byte-fallback tokenizers to
    one per byte, so at most `MAX_MISSING_BYTES` are dropped; a U+FFFD before the last
    character is text the model wrote and stays."""
    tail = len(text) - len(text.rstrip(REPLACEMENT))
    return text[: len(text) - min(tail, MAX_MISSING_BYTES)]


def split_turns(text: str, separator: str = "|||") -> list[str]:
    """Turns written on one line, e.g. "I failed. ||| Oh no! ||| I studied so hard."."""
    return [turn.strip() for turn in text.split(separator) if turn.strip()]


def empathy_weight(request: Request) -> float:
    """The request's dial w: its `empathy`, or its style as one end of the dial."""
    if request.empathy is not None:
        return request.empathy
    return float(request.style == "empathy")


def sample_latents(
    model: LisenDiff,
    context: jax.Array,  # [batch, n_ctx, d] utterance embeddings, oldest first
    context_mask: jax.Array,  # [batch, n_ctx] bool
    empathy: jax.Array,  # [batch] float: the dial w (0: default style, 1: empathy style)
    keys: jax.Array,  # [batch] PRNG keys: row i's noise comes from keys[i] alone
    plan: Plan,
    guidance: jax.Array | None = None,  # [batch] float; None: no null branch at all
    return_trajectory: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Latents [batch, L, d] at each row's dial w, and optionally every step's predicted y0
    [S, batch, L, d], both in the encoder's space.

    A plain style is the dial at w = 0 or 1, so every row runs the same chain: each step runs
    both styles' denoisers, each on its own style summary, in one call (`StyleDenoisers.each`,
    the FLOPs the training path spends on one summary), and mixes them (`sampler.steered`).
    `guidance` (a model with a null summary only) adds the same call on the null summary."""
    chex.assert_rank(context, 3)
    chex.assert_shape([keys, empathy], (context.shape[0],))
    xs = model.summary.each(context, context_mask)  # [n_styles, batch, n_queries, d]
    dial = [STYLES.index("default"), STYLES.index("empathy")]
    if guidance is not None:
        chex.assert_shape(guidance, keys.shape)
        null = model.summary.null_like(xs)

    def branches(y_t: jax.Array, t: jax.Array) -> jax.Array:  # [2 or 4, batch, L, d]
        every = model.denoisers.each(y_t, t, xs)  # [n_styles, batch, L, d]
        out = [every[s] for s in dial]
        if guidance is not None:
            # A call of its own: the context branch is then the same computation as without
            # guidance, so g = 1 gives the unguided latents (bit for bit where XLA compiles
            # that call alike in both programs).
            every_null = model.denoisers.each(y_t, t, null)
            out += [every_null[s] for s in dial]
        return jnp.stack(out)

    shape = (model.num_latents, model.latent_dim)
    denoise = steered(branches, empathy, guidance)
    return sample(denoise, plan, model.latent_stats, keys, shape, return_trajectory)


def latent_sampler(
    model: LisenDiff,
    plan: Plan,
    mesh: MeshPlan | None = None,
    return_trajectory: bool = False,
) -> Callable[..., tuple[jax.Array, jax.Array | None]]:
    """`sample_latents` for `model` as one jitted `fn(context, context_mask, empathy, keys)`.

    On a mesh the rows of every input and output are split over the data-parallel devices
    and the model's state is placed by the sharding rules, so a large batch of situations
    (e.g. for the latent analysis) is sampled on all devices at once; rows do not interact, so
    the latents equal one device's. Inputs are placed on the mesh by the call.
    """
    graphdef, state = nnx.split(model)
    jit_kw = {}
    if mesh is not None:
        state = mesh.place(state)
        rows = mesh.sharding(("batch",), (mesh.batch_divisor,))  # a prefix for every row array
        trajectory = NamedSharding(mesh.mesh, PartitionSpec(None, *rows.spec))  # [S, batch, ...]
        jit_kw = dict(
            in_shardings=(mesh.tree_shardings(state), rows, rows, rows, rows),
            out_shardings=(rows, trajectory),
        )

    @functools.partial(jax.jit, **jit_kw)
    def run(state, context, context_mask, empathy, keys):
        restored = nnx.merge(graphdef, state)
        return sample_latents(
            restored,
            context,
            context_mask,
            empathy,
            keys,
            plan,
            return_trajectory=return_trajectory,
        )

    def sample(context, context_mask, empathy, keys):
        divisor = 1 if mesh is None else mesh.batch_divisor
        if len(keys) % divisor:
            raise InputError(
                f"{len(keys)} rows do not split over the mesh's {divisor} data-parallel "
                f"devices; sample a multiple of {divisor}"
            )
        return run(state, context, context_mask, np.asarray(empathy, np.float32), keys)

    return sample


# (first: the index among the call's requests of the batch's row 0, tokens [B] int32, live
# [B] bool: the rows that drew theirs this step) -> [B] bool: rows to stop (e.g. a streaming
# client that left). Called once per decoding step, in order, while the batch decodes.
TokenSink = Callable[[int, np.ndarray, np.ndarray], np.ndarray]
_SINKS: dict[int, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {}  # by batch["sink"]
_sink_ids = itertools.count()


def _to_sink(sink_id: np.ndarray, tokens: np.ndarray, live: np.ndarray) -> np.ndarray:
    return np.asarray(_SINKS[int(sink_id)](np.asarray(tokens), np.asarray(live)), bool)


def _sink_hook(sink_id: jax.Array):
    """A `TokenHook` for `decode` that hands every step to the sink registered as `sink_id`.

    Why a host callback from inside the one jitted decode loop, rather than decoding in jitted
    chunks of N tokens from a Python loop: the loop's arithmetic is untouched (the callback
    only reads each step's tokens and can only end rows), tokens arrive one step at a time
    instead of N, the KV cache never goes back through Python between chunks, and the returned
    stop mask lets a row whose client left be masked (the loop ends early once every row is
    done or stopped). The cost is one host round trip per step.
    """

    def hook(tokens: jax.Array, live: jax.Array) -> jax.Array:
        stop = jax.ShapeDtypeStruct(tokens.shape, jnp.bool_)
        return io_callback(_to_sink, stop, sink_id, tokens, live)

    return hook


@functools.partial(jax.jit, static_argnames=("graphdef", "layout", "trace_steps"))
def _respond(graphdef, state, plan, batch, layout, values, trace_steps):
    model = nnx.merge(graphdef, state)
    ids, mask = batch["input_ids"], batch["attention_mask"]  # [B, P]
    on_tokens = _sink_hook(batch["sink"]) if "sink" in batch else None  # the reply's only
    request_key = lambda seed, i: jax.random.fold_in(jax.random.key(seed), i)
    keys = jax.vmap(request_key)(batch["seed"], batch["position"])  # [B]
    latent_keys, decode_keys = jax.vmap(jax.random.split, out_axes=1)(keys)  # [B] each
    if not model.lisendiff:
        reply = decode(model.backbone, ids, mask, decode_keys, layout, values, None, on_tokens)
        return {"reply": reply}
    if "latents" in batch:  # given by the caller: nothing to sample, no trace
        latents = batch["latents"]
    else:
        latents, trajectory = sample_latents(
            model,
            batch["context"],
            batch["context_mask"],
            batch["empathy"],
            latent_keys,
            plan,
            batch.get("guidance"),
            return_trajectory=trace_steps > 0,
        )
    out = {
        "latents": latents,
        "reply": decode(
            model.backbone,
            ids,
            mask,
            decode_keys,
            layout,
            values,
            {"latents": latents},
            on_tokens,
        ),
    }
    if trace_steps:
        last = trajectory[-trace_steps:]  # [k, B, L, d]
        k, b = last.shape[:2]
        rows = jnp.tile(jnp.arange(b), k)  # row j * B + i: step j, request i
        latents_k = last.reshape(k * b, *last.shape[2:])
        out["trace"] = decode(
            model.backbone,
            ids[rows],
            mask[rows],
            decode_keys[rows],  # a trace row draws its tokens as its request's reply does
            layout,
            values,
            {"latents": latents_k},
        )
    return out


class Listener:
    """Answers requests with one model; compiles once per batch size, prompt width, sampler
    plan and trace length (max_tokens, temperature and top_p are values of the compiled loop,
    max_tokens within a block of `generate.TOKEN_BLOCK`)."""

    def __init__(
        self,
        model: LisenDiff,
        config: ml_collections.ConfigDict,
        tokenizer: PreTrainedTokenizerBase,
        encoder: Encoder | None = None,
    ):
        self.config, self.tokenizer = config, tokenizer
        self.prompts = system_prompts(config.data)  # the ones the run trained with
        self.lisendiff = model.lisendiff
        # Guidance needs the null summary that training with context dropout learns. A model
        # with one runs the null branch for every request (g = 1 too), so that a reply does
        # not depend on whether its batch holds a guided request.
        self.guided = self.lisendiff and model.summary.null is not None
        if self.lisendiff:
            encoder = encoder or make_encoder(config.data.encoder)
            if encoder.dim != model.latent_dim:
                raise InputError(
                    f"the encoder {config.data.encoder!r} gives {encoder.dim}-d vectors, the "
                    f"model reads {model.latent_dim}-d latents"
                )
        self.encoder = encoder
        self.schedule = model.diffusion.make()
        backbone = model.backbone.config
        self.eos_ids = backbone.eos_token_ids or (tokenizer.eos_token_id,)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_positions = backbone.max_position_embeddings
        self.prompt_budget = min(config.data.max_length, self.max_positions - 1)
        self.graphdef, self.state = nnx.split(model)

    def prepare(self, options: Options) -> tuple[SamplingParams, Plan, int]:
        """Decoding parameters, sampler plan and trace length for `options`; raises ValueError
        for settings out of range before anything runs."""
        params = SamplingParams(
            max_new_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            eos_token_ids=tuple(self.eos_ids),
            pad_token_id=self.pad_id,
        )
        plan = make_plan(self.schedule, options.sampler, options.ddim_steps, options.eta)
        if options.trace_steps < 0:
            raise ValueError(f"trace steps must be >= 0, got {options.trace_steps}")
        trace_steps = min(options.trace_steps, plan.num_steps) if self.lisendiff else 0
        return params, plan, trace_steps

    def check(self, request: Request, options: Options) -> None:
        """Raises InputError when `request` cannot be answered with `options` (which `prepare`
        accepts), without running the model: a server checks each request alone, so that a
        bad one does not fail the batch it would join."""
        self._check_guidance(request)
        self._encode(request, options.max_tokens)

    def _check_guidance(self, request: Request) -> None:
        if request.guidance != 1.0 and not self.guided:
            raise InputError(
                f"guidance {request.guidance:g} needs a model trained with "
                "--config.model.denoiser.context_dropout > 0 (this one has no null context); "
                "use guidance 1"
            )

    def _encode(self, request: Request, max_tokens: int) -> Encoded:
        """`request`'s prompt cut to the run's prompt budget, if `max_tokens` more fit the
        backbone's positions; InputError, in the request's terms, if not."""
        try:
            encoded = encode_chat(
                self.tokenizer,
                request.context,
                system_prompt(request.lang, self.prompts),
                self.prompt_budget,
            )
        except ValueError as err:
            raise InputError(str(err)) from None
        prompt, context = len(encoded.input_ids), self.max_positions
        if prompt + max_tokens > context:
            raise InputError(
                f"max_tokens {max_tokens} leaves no room for the {prompt}-token prompt in this "
                f"model's {context}-token context; use max_tokens <= {context - prompt}"
            )
        return encoded

    def _pad(self, prompts: Sequence[Encoded]) -> dict:
        rows = [p.input_ids for p in prompts]
        width = prompt_width(max(len(r) for r in rows), self.prompt_budget)
        ids = np.full((len(rows), width), self.pad_id, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, row in enumerate(rows):  # left padding: every row's next token shares a slot
            ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
        return {"input_ids": ids, "attention_mask": mask}

    def _context(self, requests: Sequence[Request]) -> dict:
        n_ctx = self.config.data.max_context
        newest = [r.context[-n_ctx:] for r in requests]
        texts = list(dict.fromkeys(t for turns in newest for t in turns))
        vectors = self.encoder.encode(texts)  # [texts, d]
        row = {t: i for i, t in enumerate(texts)}
        context = np.zeros((len(requests), n_ctx, self.encoder.dim), np.float32)
        mask = np.zeros((len(requests), n_ctx), bool)
        for i, turns in enumerate(newest):
            context[i, : len(turns)] = vectors[[row[t] for t in turns]]
            mask[i, : len(turns)] = True
        out = {
            "context": context,
            "context_mask": mask,
            "empathy": np.array([empathy_weight(r) for r in requests], np.float32),
        }
        if self.guided:
            out["guidance"] = np.array([r.guidance for r in requests], np.float32)
        return out

    def reply(
        self,
        requests: Sequence[Request],
        options: Options = Options(),
        batch_size: int = 16,
        latents: np.ndarray | None = None,
        sink: TokenSink | None = None,
    ) -> list[Reply]:
        """One reply per request, in order, decoded `batch_size` requests at a time. Request i
        draws from fold_in(key(options.seed), i), or from fold_in(key(request.seed), 0) when it
        has a seed, whatever its batch.

        `latents` [len(requests), L, d] (encoder space), for a LisenDiff model only: decode
        with these instead of latents sampled from the context, e.g. the embedding of a reply
        in another language; no trace then.

        `sink` sees each reply's tokens as they are decoded (`text` turns a row's tokens so
        far into its text) and may stop rows; a stopped row's reply is not one. The replies
        of the rows it does not stop are those without a sink."""
        params, plan, trace_steps = self.prepare(options)
        given = None if latents is None else np.asarray(latents, np.float32)
        if given is not None:
            if not self.lisendiff:
                raise InputError("a model without LisenDiff modules reads no latent")
            if trace_steps:
                raise InputError("a trace follows the sampler; given latents have none")
            if given.ndim != 3 or len(given) != len(requests):
                raise InputError(
                    f"latents must be [{len(requests)} requests, L, d], got {given.shape}"
                )
        # Every prompt before any batch runs: a request that cannot be answered stops the call
        # before the model does any work.
        for r in requests:
            self._check_guidance(r)
        prompts = [self._encode(r, options.max_tokens) for r in requests]
        truncated = []
        for p, r in zip(prompts, requests, strict=True):
            truncated.append(p.kept_turns < len(r.context) or p.shortened != "none")
            if truncated[-1]:
                warnings.warn(
                    f"context cut to fit {self.prompt_budget} prompt tokens: kept the newest "
                    f"{p.kept_turns} of {len(r.context)} turn(s)"
                    + (", and only the end of that one" if p.shortened != "none" else ""),
                    ContextTruncatedWarning,
                    stacklevel=2,
                )
        # uint32: jax.random.key keeps a seed's low 32 bits, so any int seed maps as it would.
        seeds = np.array([options.seed if r.seed is None else r.seed for r in requests]) % 2**32
        positions = [0 if r.seed is not None else i for i, r in enumerate(requests)]
        replies: list[Reply] = []
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            batch = self._pad(prompts[start : start + batch_size])
            if given is not None:
                batch["latents"] = given[start : start + batch_size]
            elif self.lisendiff:
                batch.update(self._context(chunk))
            batch["seed"] = seeds[start : start + batch_size].astype(np.uint32)
            batch["position"] = np.array(positions[start : start + batch_size], np.uint32)
            if sink is not None:
                sink_id = next(_sink_ids) % 2**32
                _SINKS[sink_id] = functools.partial(sink, start)
                batch["sink"] = np.uint32(sink_id)
            try:
                out = _respond(self.graphdef, self.state, plan, batch, *params.split(), trace_steps)
                texts = self._texts(out["reply"])  # waits for the decoding, hence the sink
            finally:
                if sink is not None:
                    del _SINKS[sink_id]
            latents = np.asarray(out["latents"]) if "latents" in out else [None] * len(chunk)
            traces = [()] * len(chunk)
            if trace_steps:
                steps = np.asarray(plan.timesteps[-trace_steps:])
                trace_texts = self._texts(out["trace"])  # row j * B + i: step j, request i
                traces = [
                    tuple(
                        TraceStep(int(t), trace_texts[j * len(chunk) + i])
                        for j, t in enumerate(steps)
                    )
                    for i in range(len(chunk))
                ]
            replies += [
                Reply(text, latent, trace, cut)
                for text, latent, trace, cut in zip(
                    texts, latents, traces, truncated[start : start + batch_size], strict=True
                )
            ]
        return replies

    def text(self, tokens: Sequence[int]) -> str:
        """The reply text of a row's tokens (its EOS included or not), as `reply` gives it."""
        return without_cut_character(
            self.tokenizer.decode(tokens, skip_special_tokens=True)
        ).strip()

    def _texts(self, generation) -> list[str]:
        tokens, lengths = np.asarray(generation.tokens), np.asarray(generation.lengths)
        return [self.text(row[:n]) for row, n in zip(tokens, lengths, strict=True)]
