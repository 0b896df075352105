"""The training-memory ledger for rCM on the real Anima DiT: the bytes one rank holds, per strategy (DDP or FSDP2),
world size, batch per rank, activation checkpointing and tangent (JVP or finite difference), and whether that fits an
80 GB or 141 GB GPU. GB = 1e9 bytes everywhere (GiB is not used here).

Parameters are counted on the real architecture, built on the meta device (no memory): 1,956,405,248 = 28 blocks of
69,206,528 + 18,622,464 outside the blocks (`parameter_counts`).

States (bytes per parameter; rCM's recipe: BF16 compute, FP32 master weights, AdamW, EMA in FP32):
  ddp   every state replicated. A trainable net (student, fake score) holds bf16 weights 2 + fp32 master 4 + bf16
        grads 2 + AdamW m 4 + v 4 = 16 B/param. With W > 1 ranks add one grad-sized all-reduce buffer (DDP's buckets
        with gradient_as_bucket_view=False, or the flat torch.cat of trainer._all_reduce_grads).
  fsdp  FSDP2 per transformer block with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the sharded
        fp32 parameters are the master weights, so a trainable net holds params 4 + grads 4 + m 4 + v 4 = 16 B/param
        divided by W, plus unsharded buffers that do not shrink with W: the bf16 all-gathered blocks (the current
        one and one prefetched, and the root parameters outside the blocks) and one block's unsharded bf16 grads
        with their fp32 reduce-scatter copy.
  EMA 4 B/param (sharded under fsdp); teacher bf16 2 B/param, frozen, replicated or sharded (`teacher_sharded`).
Both nets' grads are counted as live (conservative: trainer.py now frees each net's grads right after its optimizer
step, so the true peak is lower by one net's grads, 3.9 GB under DDP at 2B); text embeddings are cached, so no text
encoder or VAE sits on the GPU.

Activations are MEASURED, never typed in (`measure_activations`): ONE real-width CosmosTransformerBlock (hidden 2048 =
16 heads x 128, mlp ratio 4, cross-attention to 512 text tokens of dim 1024, adaLN-LoRA 256, the real RoPE tables) is
run on CPU in bf16, the GPU compute dtype, so bytes are taken as measured (no conversion; in fp32 a block keeps
1.09 GB at 4,096 tokens instead of 0.65 GB), at batch 1 and 16x16, 24x24 and 32x32 latent patches (256, 576, 1024
image tokens), and these are recorded:
  saved          bytes autograd keeps for backward after one forward, counted with
                 torch.autograd.graph.saved_tensors_hooks, one count per storage, excluding the block's parameters
                 and the inputs every block shares (context, time embeddings, RoPE tables; the context is added once
                 per model). Default SDPA: the CPU flash kernel keeps q, k, v, out and the log-sum-exp like the CUDA
                 flash kernels, so no N x N matrix. `saved_math` is the same under the math kernel (which upcasts
                 bf16 to fp32 and keeps the N x N softmax); the ledger uses it only if `graph_attention="math"`.
  saved_checkpointed  the same with the block under torch.utils.checkpoint (reentrant, so its saved inputs pass the
                 hooks): the block input only.
  backward       the transient above the saved bytes while that block runs backward (torch.autograd.grad with respect
                 to the block input: weight grads belong to the states above).
  forward        the transient of one no-grad forward (teacher, fake score, rollout, fd tangent).
  jvp            the transient of one no-grad torch.func.jvp under math attention (dual tensors: the N x N scores,
                 their tangents and the fp32 softmax temporaries), tangents on hidden states and time embeddings.
Transients are tracked by a TorchDispatchMode that adds every storage an aten op creates and subtracts it when the
storage dies (a weakref); its bytes after each op form a timeline, each moment split into bytes in tensors whose last
two dims are (N, N) and the rest. Every moment k is fitted over the three token counts as a_k + b_k N (the rest) +
c_k N^2 (the N x N part, through zero), so the peak at 4,096 tokens is max_k of the fitted moments: the op that
peaks at 1,024 tokens need not be the one that peaks at 4,096. The saved bytes are fitted the same way (one moment).
The residual of the linear fit over three points is kept (`max_rel_residual`) to show linearity; batch enters as a
factor (measured at batch 1; the test checks batch 2 = 2 x batch 1). What is outside the blocks (patch embedding,
time embedding, final norm and projection) is measured the same way on the real model built with 0 blocks.
Target: a 1024^2 image -> 128^2 latent (VAE /8) -> 64^2 patches (patch 2) = 4,096 tokens.
Checks: the block measured directly at 4,096 tokens (`check_extrapolation`, ~2.5 min, 9 GB RAM) equals the
extrapolation to 4 digits in every quantity (JVP peak 5.77 GB); a real-width 2-block model keeps 2 x block + outside
+ context within 0.3 % (`validate_composition`); the tracker's live bytes after a forward equal the hooks' saved
bytes + the output. Not modelled: CUDA kernels' own workspaces (cuBLAS, flash backward accumulators: tens of MB).

Per rank (B = batch per rank, N tokens, L = 28 blocks, G = 2 graphs: the sCM forward and the DMD rollout's last call
are both alive at the backward of a student step, which dominates the critic step's single graph):
  graph phase    G B (L saved + outside + context)  [checkpointing: L saved_checkpointed instead of L saved]
                 + the larger transient on top of them: 2B no-grad forwards (the CFG teacher and fake score of DMD)
                 or B backward (checkpointing: B (saved + backward), one block recomputed at a time)
  tangent phase  before any graph exists (trainer: scm_tangent runs under no_grad before scm_loss): the larger of
                 2B no-grad forwards (the CFG teacher) and B jvp (tangent "jvp") or B forward (tangent "fd":
                 rcm.fd_time_derivative's sequential no-grad forwards, F and the central difference's two, only
                 latent-sized outputs kept between them)
  activations    max(graph phase, tangent phase); every transient adds the block's input(s), held by the caller
                 (jvp: primal and tangent), which the tracker does not see. Under FSDP2 the JVP is taken per
                 block (DESIGN.md §6): the same per-block transient.
The fp64 wrapper tensors of rcm.py are latent-sized (2 MB per sample) and left out.

A configuration fits a GPU when its total is at most (1 - HEADROOM) of the card's nominal capacity: 10 % is kept
for the CUDA context, NCCL buffers and the caching allocator's fragmentation (nominal 80e9 / 141e9 B; the cards
report a little more, so the reading is conservative).
"""
from __future__ import annotations

import contextlib
import math
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.utils.checkpoint
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from ..networks import ANIMA_2B_TRANSFORMER, transformer_velocity

GB = 1e9
TEXT_TOKENS = 512
IMAGE_TOKENS_1024 = 4096          # 1024^2 px -> 128^2 latent -> 64^2 patches of 2x2
MEASURE_SIDES = (16, 24, 32)      # latent patches per side measured: 256, 576, 1024 tokens
GPU_CAPACITY_GB = {"80 GB": 80.0, "141 GB": 141.0}
HEADROOM = 0.10
RCM_GLOBAL_BATCH = 512            # Cosmos-Predict2 2B T2I in the rCM paper (Table 4)

TRAINABLE_BYTES = {               # bytes per parameter of a trainable net (student, fake score)
    "ddp": {"weights (bf16)": 2, "master (fp32)": 4, "grads (bf16)": 2, "adam m (fp32)": 4, "adam v (fp32)": 4},
    "fsdp": {"params = master (fp32)": 4, "grads (fp32)": 4, "adam m (fp32)": 4, "adam v (fp32)": 4},
}
EMA_BYTES = 4
TEACHER_BYTES = 2
COMPUTE_BYTES = 2                 # bf16: all-gathered params, unsharded grads
REDUCE_BYTES = 4                  # fp32 reduce-scatter copy of one block's grads (FSDP2 reduce_dtype)
STRATEGIES = ("ddp", "fsdp")
TANGENTS = ("jvp", "fd")


# --- parameters (meta device) ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamCounts:
    total: int
    per_block: int
    blocks: int

    @property
    def outside_blocks(self) -> int:
        return self.total - self.per_block * self.blocks


def parameter_counts(config: Optional[dict] = None) -> ParamCounts:
    """Parameter counts of CosmosTransformer3DModel(**config) built on the meta device (default: the real Anima DiT)."""
    from accelerate import init_empty_weights
    from diffusers import CosmosTransformer3DModel

    with init_empty_weights():
        model = CosmosTransformer3DModel(**(config or ANIMA_2B_TRANSFORMER))
    assert all(p.device.type == "meta" for p in model.parameters())
    per_block = sum(p.numel() for p in model.transformer_blocks[0].parameters())
    return ParamCounts(total=sum(p.numel() for p in model.parameters()), per_block=per_block,
                       blocks=len(model.transformer_blocks))


# --- counting saved and live bytes ----------------------------------------------------------------------------------

def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _is_square(t: torch.Tensor, n: int) -> bool:
    return t.dim() >= 2 and t.shape[-1] == n and t.shape[-2] == n


class SavedBytes:
    """saved_tensors_hooks that count what autograd keeps: one count per storage; `exclude` holds tensors whose
    storages are not counted (parameters, shared inputs). `square` bytes are those in [..., n, n] tensors."""

    def __init__(self, exclude=(), n_tokens: int = -1):
        self.exclude = {_storage_key(t) for t in exclude if t.numel()}
        self.n = n_tokens
        self.storages: dict[int, tuple[int, bool]] = {}

    def pack(self, t: torch.Tensor):
        if t.numel() and t.device.type != "meta":
            key = _storage_key(t)
            if key not in self.exclude and key not in self.storages:
                self.storages[key] = (t.untyped_storage().nbytes(), _is_square(t, self.n))
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    @property
    def total(self) -> int:
        return sum(b for b, _ in self.storages.values())

    @property
    def square(self) -> int:
        return sum(b for b, sq in self.storages.values() if sq)


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created by aten ops while active and still alive; `timeline` has (rest, square) after
    every op. Storages of `exclude` (parameters, inputs) are never counted."""

    def __init__(self, exclude=(), n_tokens: int = -1):
        super().__init__()
        self.exclude = {_storage_key(t) for t in exclude if t.numel()}
        self.n = n_tokens
        self._seen = WeakIdKeyDictionary()
        self.rest = self.square = 0
        self.timeline: list[tuple[int, int]] = []

    def _free(self, nbytes: int, square: bool, _ref) -> None:
        if square:
            self.square -= nbytes
        else:
            self.rest -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            # efficient zero tensors (the tangent of a weight under forward AD) have no storage
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel() and not t._is_zerotensor():
                st = t.untyped_storage()
                if st in self._seen or st.data_ptr() in self.exclude:
                    continue
                nbytes, square = st.nbytes(), _is_square(t, self.n)
                self._seen[st] = weakref.ref(st, lambda r, b=nbytes, s=square: self._free(b, s, r))
                if square:
                    self.square += nbytes
                else:
                    self.rest += nbytes
        self.timeline.append((self.rest, self.square))
        return out

    @property
    def live(self) -> int:
        return self.rest + self.square

    def mark(self) -> int:
        """Index of the next timeline entry (to cut the timeline into phases)."""
        return len(self.timeline)


# --- fits -------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fit:
    """bytes(N) = const + per_token N + per_token2 N^2, per sample (batch 1)."""
    const: float
    per_token: float
    per_token2: float = 0.0
    max_rel_residual: float = 0.0

    def __call__(self, n: int) -> float:
        return self.const + self.per_token * n + self.per_token2 * n * n


def _fit_moments(ns, rest: np.ndarray, square: np.ndarray):
    """rest[i, k] = a_k + b_k ns[i] (least squares), square[i, k] = c_k ns[i]^2 (through zero)."""
    ns = np.asarray(ns, dtype=np.float64)
    design = np.stack([np.ones_like(ns), ns], axis=1)
    coef, *_ = np.linalg.lstsq(design, rest, rcond=None)
    c = (square * ns[:, None] ** 2).sum(0) / (ns ** 4).sum()
    predicted = design @ coef + c[None, :] * ns[:, None] ** 2
    scale = np.maximum((rest + square).max(0), 1.0)
    residual = float((np.abs(predicted - rest - square) / scale).max()) if rest.size else 0.0
    return coef[0], coef[1], c, residual


def fit_points(points: dict[int, tuple[int, int]]) -> Fit:
    """{tokens: (rest, square) bytes} of one quantity -> Fit."""
    ns = sorted(points)
    rest = np.array([[points[n][0]] for n in ns], dtype=np.float64)
    square = np.array([[points[n][1]] for n in ns], dtype=np.float64)
    a, b, c, residual = _fit_moments(ns, rest, square)
    return Fit(float(a[0]), float(b[0]), float(c[0]), residual)


@dataclass
class PeakFit:
    """A transient: every moment of the op timeline fitted in N; the peak at N is the largest fitted moment."""
    const: list
    per_token: list
    per_token2: list
    max_rel_residual: float
    aligned: bool            # the timelines had the same length at every N (else: the per-N peaks were fitted)

    def __call__(self, n: int) -> float:
        return float(max(self._moments(n))) if self.const else 0.0

    def _moments(self, n: int):
        return [a + b * n + c * n * n for a, b, c in zip(self.const, self.per_token, self.per_token2)]

    def at(self, n: int) -> Fit:
        """The moment that peaks at n, as a Fit (what a reader sees)."""
        if not self.const:
            return Fit(0.0, 0.0)
        k = int(np.argmax(self._moments(n)))
        return Fit(self.const[k], self.per_token[k], self.per_token2[k], self.max_rel_residual)


def fit_timelines(timelines: dict[int, list[tuple[int, int]]]) -> PeakFit:
    ns = sorted(timelines)
    lengths = {len(timelines[n]) for n in ns}
    if len(lengths) == 1 and lengths.pop() > 0:
        rest = np.array([[r for r, _ in timelines[n]] for n in ns], dtype=np.float64)
        square = np.array([[s for _, s in timelines[n]] for n in ns], dtype=np.float64)
        aligned = True
    else:  # fall back to the peak of each N (its split at that moment)
        peaks = [max(timelines[n], key=sum) if timelines[n] else (0, 0) for n in ns]
        rest = np.array([[p[0]] for p in peaks], dtype=np.float64)
        square = np.array([[p[1]] for p in peaks], dtype=np.float64)
        aligned = False
    a, b, c, residual = _fit_moments(ns, rest, square)
    return PeakFit(a.tolist(), b.tolist(), c.tolist(), residual, aligned)


# --- the measurement -----------------------------------------------------------------------------------------------

def _block_config(config: dict) -> dict:
    return dict(num_attention_heads=config["num_attention_heads"], attention_head_dim=config["attention_head_dim"],
                cross_attention_dim=config["text_embed_dim"], mlp_ratio=config["mlp_ratio"],
                adaln_lora_dim=config["adaln_lora_dim"])


def _cast(model: torch.nn.Module, dtype) -> torch.nn.Module:
    """nn.Module.to: ModelMixin.to warns about learnable_pos_embed, which Anima's config does not have."""
    return torch.nn.Module.to(model, dtype)


def _block_inputs(config: dict, side: int, batch: int, dtype, text_tokens: int, generator: torch.Generator):
    from diffusers.models.transformers.transformer_cosmos import CosmosRotaryPosEmbed
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    n = side * side
    patch = config["patch_size"]
    rope = CosmosRotaryPosEmbed(config["attention_head_dim"], config["max_size"], patch,
                                rope_scale=config["rope_scale"])
    # fp32 tables, as the model passes them
    cos, sin = rope(torch.zeros(1, config["in_channels"] + 1, 1, side * patch[1], side * patch[2]))

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)
    return dict(x=randn(batch, n, hidden), context=randn(batch, text_tokens, config["text_embed_dim"]),
                emb=randn(batch, hidden), temb=randn(batch, 3 * hidden), rope=(cos, sin))


def _sdpa(math_kernel: bool):
    if not math_kernel:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


def _check_sides(config: dict, sides, text_tokens: int) -> None:
    """A token count equal to another dimension that meets the token axis ([n, head_dim], [n, hidden],
    [n, mlp hidden], [n, text tokens]) would let [..., n, n] tensors that are not self-attention scores into the
    N x N part."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    other = {config["attention_head_dim"], hidden, int(hidden * config["mlp_ratio"]), text_tokens}
    clashes = sorted(s * s for s in sides if s * s in other)
    if clashes:
        raise ValueError(f"token counts {clashes} equal another dimension of the block {sorted(other)}; "
                         f"pick other sides")


def measure_block_point(block: torch.nn.Module, inputs: dict, jvp: bool = True) -> dict:
    """One token count: saved bytes (default SDPA, math SDPA, checkpointed), and the timelines of one backward, one
    no-grad forward and one no-grad JVP. Bytes are for the batch of `inputs`."""
    x, ctx, emb, temb, rope = inputs["x"], inputs["context"], inputs["emb"], inputs["temb"], inputs["rope"]
    n = x.shape[1]
    params = [*block.parameters(), *block.buffers()]
    shared = [ctx, emb, temb, *rope]

    def run(h, e=emb, te=temb):
        return block(h, ctx, e, te, rope)
    out = {"tokens": n}
    # graph forward (default SDPA) + backward, saved bytes by hooks and live bytes by the tracker
    xg = x.detach().clone().requires_grad_(True)
    saved = SavedBytes(params + shared, n)
    tracker = LiveBytes(params + shared + [xg], n)
    with tracker, saved.hooks():
        y = run(xg)
    out["saved"] = (saved.total - saved.square, saved.square)
    out["live_after_forward"] = tracker.live + xg.untyped_storage().nbytes()  # the tracker does not own the input
    out["output"] = y.untyped_storage().nbytes()
    start, at_backward = tracker.mark(), tracker.live
    with tracker:
        (grad,) = torch.autograd.grad(y, xg, torch.ones_like(y))
    out["backward"] = [(r - at_backward, s) for r, s in tracker.timeline[start:]]  # above the saved graph
    del y, grad
    # math SDPA: the N x N softmax is kept (fp32)
    saved = SavedBytes(params + shared, n)
    with _sdpa(True), saved.hooks():
        y = run(xg)
    out["saved_math"] = (saved.total - saved.square, saved.square)
    del y
    # activation checkpointing: what the block keeps is its input
    saved = SavedBytes(params + shared, n)
    with saved.hooks():
        y = torch.utils.checkpoint.checkpoint(run, xg, use_reentrant=True)
    out["saved_checkpointed"] = (saved.total - saved.square, saved.square)
    del y
    # no-grad forward: the transient of teacher / fake score / rollout / fd calls
    tracker = LiveBytes(params + shared + [x], n)
    with torch.no_grad(), tracker:
        y = run(x)
    out["forward"] = list(tracker.timeline)
    del y
    if jvp:  # no-grad JVP under math attention, as rcm.scm_tangent takes it
        tangents = (torch.randn_like(x), torch.randn_like(emb), torch.randn_like(temb))
        tracker = LiveBytes(params + shared + [x, *tangents], n)
        with torch.no_grad(), _sdpa(True), tracker:
            primal, tangent = torch.func.jvp(run, (x, emb, temb), tangents)
        out["jvp"] = list(tracker.timeline)
        del primal, tangent
    return out


def measure_outside_point(model: torch.nn.Module, side: int, batch: int, dtype, text_tokens: int,
                          generator: torch.Generator, count_context: bool = False) -> tuple[int, int]:
    """Saved bytes of one graph forward of a whole model (for the part outside the blocks: the model built with
    0 blocks). The context is counted only with `count_context` (a 0-block model never reads it)."""
    cfg = model.config
    p = cfg.patch_size
    x = torch.randn(batch, cfg.in_channels, 1, side * p[1], side * p[2], generator=generator).to(dtype)
    sigma = torch.rand(batch, generator=generator).to(dtype)
    context = torch.randn(batch, text_tokens, cfg.text_embed_dim, generator=generator).to(dtype)
    saved = SavedBytes([*model.parameters(), x, sigma] + ([] if count_context else [context]), side * side)
    with saved.hooks():
        transformer_velocity(model, x, sigma, context)
    return saved.total - saved.square, saved.square


@dataclass
class Activations:
    """Measured activation coefficients, bytes per sample (batch 1) at `dtype`, of one block and of the rest."""
    dtype: str
    hidden: int
    text_tokens: int
    text_dim: int
    tokens_measured: list
    saved: Fit                     # per block, graph forward, default (flash-like) SDPA
    saved_math: Fit                # per block, graph forward, math SDPA (N x N kept)
    saved_checkpointed: Fit        # per block, under activation checkpointing
    outside: Fit                   # outside the blocks, graph forward
    backward: PeakFit              # per block, transient above the graph during its backward
    forward: PeakFit               # per block, no-grad forward transient
    jvp: PeakFit                   # per block, no-grad JVP transient (math SDPA)
    measured: dict = field(default_factory=dict)   # {tokens: {quantity: bytes per sample}} (transients: peaks)
    checks: dict = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def element_bytes(self) -> int:
        return torch.finfo(getattr(torch, self.dtype)).bits // 8

    def input_bytes(self, n: int) -> int:
        """One block's input hidden states per sample (held by the caller during a transient)."""
        return n * self.hidden * self.element_bytes

    def context_bytes(self) -> int:
        """The text context, saved once per graph (every block's to_k/to_v keep the same tensor)."""
        return self.text_tokens * self.text_dim * self.element_bytes

    def per_sample(self, n: int, layers: int, graph_attention: str = "flash") -> dict:
        """Full-model bytes per sample at n tokens (see the module docstring)."""
        saved = self.saved_math if graph_attention == "math" else self.saved
        outside = self.outside(n) + self.context_bytes()
        return {
            "graph": layers * saved(n) + outside,
            "graph_checkpointed": layers * self.saved_checkpointed(n) + outside,
            "block_saved": saved(n),
            "backward": self.backward(n),
            "forward": self.forward(n) + self.input_bytes(n),
            "jvp": self.jvp(n) + 2 * self.input_bytes(n),
        }

    def coefficients(self, n: int = IMAGE_TOKENS_1024) -> list[dict]:
        """Rows for a reader: each measured quantity as const + per_token N + per_token2 N^2 (per sample) and its
        value at n tokens (for a transient: the op moment that peaks at n)."""
        rows = []
        for name, q in (("saved / block (flash)", self.saved), ("saved / block (math SDPA)", self.saved_math),
                        ("saved / block (checkpointed)", self.saved_checkpointed),
                        ("saved outside blocks", self.outside), ("backward transient / block", self.backward),
                        ("no-grad forward transient / block", self.forward), ("jvp transient / block", self.jvp)):
            f = q.at(n) if isinstance(q, PeakFit) else q
            rows.append({"quantity": name, "const B": round(f.const), "B per token": round(f.per_token, 1),
                         "B per token^2": round(f.per_token2, 3), f"MB at {n} tokens": round(q(n) / 1e6, 1),
                         "max rel residual": f"{f.max_rel_residual:.1e}"})
        return rows

    def to_dict(self) -> dict:
        return asdict(self)


def measure_activations(config: Optional[dict] = None, sides=MEASURE_SIDES, dtype=torch.bfloat16, batch: int = 1,
                        text_tokens: int = TEXT_TOKENS, threads: Optional[int] = None, jvp: bool = True,
                        seed: int = 0) -> Activations:
    """Measure one real-width block (and the model's outside part) at the token counts sides^2; see the docstring.
    ~35 s on 2 shared CPU cores in bf16 for the real config. Coefficients are per sample (divided by `batch`)."""
    from diffusers import CosmosTransformer3DModel
    from diffusers.models.transformers.transformer_cosmos import CosmosTransformerBlock

    config = dict(config or ANIMA_2B_TRANSFORMER)
    _check_sides(config, sides, text_tokens)
    started = time.perf_counter()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        block = CosmosTransformerBlock(**_block_config(config)).to(dtype)
        outside_model = _cast(CosmosTransformer3DModel(**{**config, "num_layers": 0}), dtype)
        points, outside = {}, {}
        for side in sides:
            inputs = _block_inputs(config, side, batch, dtype, text_tokens, generator)
            points[side * side] = measure_block_point(block, inputs, jvp=jvp)
            outside[side * side] = measure_outside_point(outside_model, side, batch, dtype, text_tokens, generator)
    finally:
        torch.set_num_threads(old_threads)

    def per_sample(pair):
        return tuple(v / batch for v in pair)

    def timelines(key):
        return {n: [per_sample(m) for m in p[key]] for n, p in points.items()} if key in points[min(points)] else {}
    checks = {f"live after forward / (saved + output), {n} tokens":
              round(p["live_after_forward"] / (sum(p["saved"]) + p["output"]), 4) for n, p in points.items()}
    measured = {n: {"saved": sum(p["saved"]) / batch, "saved_math": sum(p["saved_math"]) / batch,
                    "saved_checkpointed": sum(p["saved_checkpointed"]) / batch, "outside": sum(outside[n]) / batch,
                    **{k: max(map(sum, p[k])) / batch for k in ("backward", "forward", "jvp") if k in p}}
                for n, p in points.items()}
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    empty = PeakFit([], [], [], 0.0, True)
    return Activations(
        dtype=str(dtype).removeprefix("torch."), hidden=hidden, text_tokens=text_tokens,
        text_dim=config["text_embed_dim"], tokens_measured=sorted(points),
        saved=fit_points({n: per_sample(p["saved"]) for n, p in points.items()}),
        saved_math=fit_points({n: per_sample(p["saved_math"]) for n, p in points.items()}),
        saved_checkpointed=fit_points({n: per_sample(p["saved_checkpointed"]) for n, p in points.items()}),
        outside=fit_points({n: per_sample(v) for n, v in outside.items()}),
        backward=fit_timelines(timelines("backward")), forward=fit_timelines(timelines("forward")),
        jvp=fit_timelines(timelines("jvp")) if jvp else empty, measured=measured, checks=checks,
        wall_s=round(time.perf_counter() - started, 1))


def validate_composition(acts: Activations, config: Optional[dict] = None, layers: int = 2, side: int = 16,
                         dtype=torch.bfloat16, threads: Optional[int] = None, seed: int = 0) -> dict:
    """Saved bytes of a whole `layers`-block model's graph forward (hooks, batch 1) against the ledger's
    layers x block + outside + context: checks that the per-block measurement composes into the model."""
    from diffusers import CosmosTransformer3DModel

    config = dict(config or ANIMA_2B_TRANSFORMER)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = _cast(CosmosTransformer3DModel(**{**config, "num_layers": layers}), dtype)
        generator = torch.Generator().manual_seed(seed)
        rest, square = measure_outside_point(model, side, 1, dtype, acts.text_tokens, generator, count_context=True)
    finally:
        torch.set_num_threads(old_threads)
    predicted = acts.per_sample(side * side, layers)["graph"]
    return {"layers": layers, "tokens": side * side, "measured": rest + square, "predicted": predicted,
            "ratio": (rest + square) / predicted}


def check_extrapolation(acts: Activations, config: Optional[dict] = None, side: int = 64, dtype=torch.bfloat16,
                        jvp: bool = True, threads: Optional[int] = None, seed: int = 1) -> dict:
    """Measure the block directly at side^2 tokens (64^2 = 4,096: the 1024^2 image; ~1-2 min and ~8 GB of RAM on
    CPU with the JVP) and compare with the fitted coefficients: {quantity: {measured, predicted, ratio}}."""
    from diffusers.models.transformers.transformer_cosmos import CosmosTransformerBlock

    config = dict(config or ANIMA_2B_TRANSFORMER)
    _check_sides(config, (side,), acts.text_tokens)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        block = CosmosTransformerBlock(**_block_config(config)).to(dtype)
        inputs = _block_inputs(config, side, 1, dtype, acts.text_tokens, torch.Generator().manual_seed(seed))
        point = measure_block_point(block, inputs, jvp=jvp)
    finally:
        torch.set_num_threads(old_threads)
    n = side * side
    measured = {"saved": sum(point["saved"]), "saved_math": sum(point["saved_math"]),
                "saved_checkpointed": sum(point["saved_checkpointed"]),
                **{k: max(map(sum, point[k])) for k in ("backward", "forward", "jvp") if k in point}}
    out = {}
    for k, v in measured.items():
        predicted = getattr(acts, k)(n)
        out[k] = {"measured": v, "predicted": predicted, "ratio": v / predicted if predicted else float("nan")}
    return out


# --- the per-rank ledger --------------------------------------------------------------------------------------------

def activation_bytes(acts: Activations, batch: int, checkpointing: bool, tangent: str,
                     tokens: int = IMAGE_TOKENS_1024, layers: int = 28, graphs: int = 2,
                     graph_attention: str = "flash") -> dict:
    """Peak activation bytes of one rank in an rCM student step (module docstring)."""
    if tangent not in TANGENTS:
        raise ValueError(f"tangent {tangent!r}: allowed {list(TANGENTS)}")
    s = acts.per_sample(tokens, layers, graph_attention)
    graph = graphs * batch * (s["graph_checkpointed"] if checkpointing else s["graph"])
    backward = batch * (s["block_saved"] + s["backward"] if checkpointing else s["backward"])
    graph_phase = graph + max(2 * batch * s["forward"], backward)
    tangent_phase = max(2 * batch * s["forward"], batch * (s["jvp"] if tangent == "jvp" else s["forward"]))
    return {"graphs": graph, "graph phase": graph_phase, "tangent phase": tangent_phase,
            "peak": max(graph_phase, tangent_phase)}


def rank_ledger(counts: ParamCounts, acts: Activations, strategy: str, world_size: int, batch: int,
                checkpointing: bool, tangent: str, *, tokens: int = IMAGE_TOKENS_1024, teacher_sharded: bool = False,
                graphs: int = 2, prefetch_blocks: int = 2, graph_attention: str = "flash",
                trainable_bytes: Optional[dict] = None, headroom: float = HEADROOM,
                capacities: Optional[dict] = None) -> dict:
    """Bytes one rank holds (states, buffers, peak activations), the total and whether it fits each GPU."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: allowed {list(STRATEGIES)}")
    if world_size < 1 or batch < 0:
        raise ValueError("world_size >= 1 and batch >= 0")
    per_param = trainable_bytes or TRAINABLE_BYTES[strategy]
    shard = world_size if strategy == "fsdp" else 1
    p = counts.total
    states = {f"{net} {name}": p * b / shard for net in ("student", "fake score") for name, b in per_param.items()}
    states["EMA (fp32)"] = p * EMA_BYTES / shard
    states["teacher (bf16)"] = p * TEACHER_BYTES / (shard if teacher_sharded else 1)
    buffers = {}
    if strategy == "ddp" and world_size > 1:
        grad_bytes = next((b for name, b in per_param.items() if name.startswith("grads")), COMPUTE_BYTES)
        buffers["grad all-reduce buffer"] = p * grad_bytes
    if strategy == "fsdp":
        buffers["all-gathered bf16 blocks + root"] = (
            (prefetch_blocks * counts.per_block + counts.outside_blocks) * COMPUTE_BYTES)
        buffers["one block's unsharded grads + fp32 reduce copy"] = counts.per_block * (COMPUTE_BYTES + REDUCE_BYTES)
    activations = activation_bytes(acts, batch, checkpointing, tangent, tokens, counts.blocks, graphs,
                                   graph_attention)
    total = sum(states.values()) + sum(buffers.values()) + activations["peak"]
    row = {"strategy": strategy, "GPUs": world_size, "batch/rank": batch, "checkpointing": checkpointing,
           "tangent": tangent, "teacher": "sharded" if (teacher_sharded and strategy == "fsdp") else "replicated",
           "states GB": sum(states.values()) / GB, "buffers GB": sum(buffers.values()) / GB,
           "activations GB": activations["peak"] / GB, "total GB": total / GB,
           "states": states, "buffers": buffers, "activations": activations}
    for gpu, ok in fits(total, headroom, capacities).items():
        row[f"fits {gpu}"] = ok
    return row


def fits(total_bytes: float, headroom: float = HEADROOM, capacities: Optional[dict] = None) -> dict:
    """{gpu: total <= (1 - headroom) x capacity}."""
    capacities = capacities or GPU_CAPACITY_GB
    return {gpu: total_bytes <= (1 - headroom) * cap * GB for gpu, cap in capacities.items()}


def ledger_table(counts: ParamCounts, acts: Activations, strategies=STRATEGIES, world_sizes=(1, 8),
                 batches=(1, 2, 4, 8, 16), checkpointing=(False, True), tangents=TANGENTS, **kw) -> list[dict]:
    return [rank_ledger(counts, acts, s, w, b, c, t, **kw)
            for s in strategies for w in world_sizes for c in checkpointing for t in tangents for b in batches]


def max_batch_per_rank(counts: ParamCounts, acts: Activations, strategy: str, world_size: int, checkpointing: bool,
                       tangent: str, gpu: str, limit: int = 1024, **kw) -> int:
    """The largest batch per rank that fits `gpu` (0: not even batch 1). The total is non-decreasing in batch."""
    def ok(b):
        return rank_ledger(counts, acts, strategy, world_size, b, checkpointing, tangent, **kw)[f"fits {gpu}"]
    if not ok(1):
        return 0
    lo, hi = 1, limit
    if ok(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def global_batch_plan(world_size: int, max_batch: int, global_batch: int = RCM_GLOBAL_BATCH) -> Optional[dict]:
    """ranks x batch per rank x accumulation = global batch, with the batch per rank the largest power of two
    <= max_batch (and <= global / ranks); None when nothing fits."""
    if max_batch < 1:
        return None
    b = 2 ** int(math.log2(min(max_batch, max(1, global_batch // world_size))))
    accumulation = math.ceil(global_batch / (world_size * b))
    return {"ranks": world_size, "batch/rank": b, "accumulation": accumulation,
            "global": world_size * b * accumulation}


def fit_summary(counts: ParamCounts, acts: Activations, strategies=STRATEGIES, world_sizes=(1, 8),
                checkpointing=(False, True), tangents=TANGENTS, global_batch: int = RCM_GLOBAL_BATCH,
                capacities: Optional[dict] = None, **kw) -> list[dict]:
    """Per configuration and GPU: the largest batch per rank and the plan to reach the global batch."""
    capacities = capacities or GPU_CAPACITY_GB
    rows = []
    for s in strategies:
        for w in world_sizes:
            for c in checkpointing:
                for t in tangents:
                    row = {"strategy": s, "GPUs": w, "checkpointing": c, "tangent": t}
                    for gpu in capacities:
                        m = max_batch_per_rank(counts, acts, s, w, c, t, gpu, capacities=capacities, **kw)
                        plan = global_batch_plan(w, m, global_batch)
                        row[f"max batch/rank {gpu}"] = m
                        row[f"to {global_batch} on {gpu}"] = (
                            f"{w} x {plan['batch/rank']} x {plan['accumulation']} accum" if plan else "does not fit")
                    rows.append(row)
    return rows


TABLE_COLUMNS = ("strategy", "GPUs", "batch/rank", "checkpointing", "tangent", "states GB", "buffers GB",
                 "activations GB", "total GB", "fits 80 GB", "fits 141 GB")


def markdown(rows: list[dict], columns=None) -> str:
    """A markdown table of `rows` (floats to 1 decimal, booleans as yes/no)."""
    columns = list(columns or rows[0].keys())

    def cell(v):
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.1f}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def conclusions(counts: ParamCounts, acts: Activations, tokens: int = IMAGE_TOKENS_1024, headroom: float = HEADROOM,
                capacities: Optional[dict] = None, global_batch: int = RCM_GLOBAL_BATCH, **kw) -> list[str]:
    """The key readings of the ledger, as sentences (numbers from this run's measurement)."""
    capacities = capacities or GPU_CAPACITY_GB
    s = acts.per_sample(tokens, counts.blocks)
    lines = []

    def states(strategy, world, **extra):
        return rank_ledger(counts, acts, strategy, world, 0, False, "fd", tokens=tokens, **{**kw, **extra})
    ddp1, fsdp8 = states("ddp", 1), states("fsdp", 8, teacher_sharded=False)
    fsdp8_sharded = states("fsdp", 8, teacher_sharded=True)
    teacher = "sharded" if kw.get("teacher_sharded") else "replicated"
    lines.append(
        f"States per rank ({counts.total:,} params): DDP {ddp1['states GB']:.1f} GB (student and fake score "
        f"16 B/param each, EMA 4, teacher 2); FSDP2 on 8 GPUs {fsdp8['states GB']:.1f} GB with the teacher "
        f"replicated, {fsdp8_sharded['states GB']:.1f} GB sharded (+{fsdp8['buffers GB']:.2f} GB unsharded buffers).")
    lines.append(
        f"Activations per sample at {tokens} tokens ({acts.dtype}, measured): one DiT graph {s['graph'] / GB:.1f} GB "
        f"({counts.blocks} x {s['block_saved'] / 1e6:.0f} MB per block + outside), a student step keeps 2 graphs = "
        f"{2 * s['graph'] / GB:.1f} GB; with checkpointing {2 * s['graph_checkpointed'] / GB:.2f} GB; the no-grad "
        f"JVP under math attention peaks at {s['jvp'] / GB:.1f} GB, an fd forward at {s['forward'] / GB:.2f} GB.")
    usable = {gpu: (1 - headroom) * cap for gpu, cap in capacities.items()}
    for strategy, world in (("ddp", 1), ("ddp", 8), ("fsdp", 1), ("fsdp", 8)):
        base = states(strategy, world)
        for gpu in capacities:
            name = f"{'DDP' if strategy == 'ddp' else 'FSDP2'} on {world} x {gpu}"
            if strategy == "fsdp":
                name += f" (teacher {teacher})"
            fixed = base["states GB"] + base["buffers GB"]
            if fixed > usable[gpu]:
                lines.append(f"{name}: does not fit even at batch 1 (states and buffers alone {fixed:.1f} GB > "
                             f"{usable[gpu]:.1f} GB usable).")
                continue
            parts = []
            for ckpt, tangent, label in ((False, "jvp", "no checkpointing"), (True, "jvp", "checkpointing + jvp"),
                                         (True, "fd", "checkpointing + fd")):
                m = max_batch_per_rank(counts, acts, strategy, world, ckpt, tangent, gpu, tokens=tokens,
                                       headroom=headroom, capacities=capacities, **kw)
                plan = global_batch_plan(world, m, global_batch)
                parts.append(f"{label} {m}" + (f" ({world} x {plan['batch/rank']} x {plan['accumulation']} accum "
                                               f"= {global_batch})" if plan else ""))
            lines.append(f"{name}: batch per rank up to " + "; ".join(parts) + ".")
    ckpt_graph = 2 * s["graph_checkpointed"] + max(2 * s["forward"], s["block_saved"] + s["backward"])
    lines.append(
        f"With checkpointing the tangent decides: the JVP transient ({s['jvp'] / GB:.1f} GB/sample) exceeds the "
        f"checkpointed graph phase ({ckpt_graph / GB:.2f} GB/sample), so fd allows ~{s['jvp'] / ckpt_graph:.1f}x the "
        f"batch; without checkpointing the two graphs dominate and jvp vs fd does not change the peak.")
    lines.append("FSDP2 + jvp rows assume a per-block JVP (DESIGN.md §6); the trainer refuses fsdp with the jvp tangent, "
                 "so under FSDP2 the runnable tangent is fd, which is also the one with the larger batch.")
    return lines
