"""Static-shape step phases, each one function of tensors that `torch.compile(fullgraph=True)` captures.

The engine's eager step (engine.py) runs the same algorithm op by op, with shapes that change
every step (the block's head, the pending width, the active rows). Here a step runs at a
*bucket* instead, and each phase is one graph per bucket:

- rows: the active rows rounded up to `BATCH_BUCKETS` (1, 2, 4, ..., 128, then the pool's rows);
  the slots past the active ones are free slots (length 0, `active` 0), computed and ignored;
- tree: one of the budget table's shapes, always drafted to its full depth (the host cuts what a
  row does not need, as it does at EOS), so a shape is one graph;
- length: attention reads the first S token slots of every row, S the longest committed row
  rounded up to `LENGTH_BUCKET`; the phase's own tokens (the draft's pending feed and tree levels,
  the verify's root and nodes) are kept out of the pool while it runs and written to it once, at
  the end (`commit_block`: one indexed store for every layer, which inductor keeps in place);
- pending: the tokens the draft has not seen, padded to a power of two.
Where a row's tokens sit follows from lengths on the device, so no offset is a shape or a host read.

Phases:
  draft_phase  feed the pending tokens, grow the tree depth by depth, prune, commit the feed
               -> the tree's tensors;
  verify_phase the target over [last token, tree], acceptance, commit to the target pool, the
               slot state's update, and the one tensor the host reads.
`compile="static"` runs these functions uncompiled (what the graphs compute: the lossless suites
run it); "on" compiles them; "off" is the engine's own eager step at exact shapes.
On CUDA the compile mode is "reduce-overhead" (CUDA graphs: a bucket's phase is one graph
replay); on a CPU inductor's C++ kernels ("default" mode). Compiled graphs live in the process;
inductor caches its generated code under $TORCHINDUCTOR_CACHE_DIR (default
/tmp/torchinductor_$USER), so a later process compiles the same graphs faster from that cache.

Dimensions: B rows of a bucket, S token slots read, P pending width, F frontier, K top-k,
T temp slots of the tree, N tree nodes, A max accepted nodes.
"""
from __future__ import annotations

import math
import os
import time
import types
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from . import models
from .consts import arange
from .kvpool import float_mask
from .lean import supports_lean
from .tree import NEG_INF, DraftTree, TreeConfig, TreeLayout, prune_tree, verify_positions, verify_visibility
from .verify import accept, inverse_cdf, slot_uniforms, target_probs

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LENGTH_BUCKET = 64
COMPILE_MODES = ("auto", "on", "off", "static")


def batch_bucket(rows: int, capacity: int) -> int:
    """The bucket a step over `rows` active rows runs at: the smallest of BATCH_BUCKETS that holds
    them, else the next multiple of the largest; never more than the pool's `capacity` rows."""
    for b in BATCH_BUCKETS:
        if b >= rows:
            return min(b, capacity)
    top = BATCH_BUCKETS[-1]
    return min(-(-rows // top) * top, capacity)


def length_bucket(needed: int, capacity: int) -> int:
    """Token slots a phase reads: `needed` rounded up to LENGTH_BUCKET (at least one bucket), at most
    the pool's length."""
    return min(max(1, -(-needed // LENGTH_BUCKET)) * LENGTH_BUCKET, capacity)


def pending_bucket(width: int) -> int:
    return 1 << max(0, width - 1).bit_length()


def graph_blocker(model) -> str | None:
    """Why a model cannot run in the static phases (None when it can)."""
    if not supports_lean(model):
        return f"text model {models.text_config(model).model_type!r} has no lean forward (decoding/lean.py)"
    if models.sliding_window(model)[0] is not None:
        return "sliding-window attention is not in the static phases yet (use --compile off)"
    return None


class _BlockLayer:
    """One layer of `BlockKV`: keeps a forward's keys/values as the phase's next block and returns
    the window's keys/values followed by every block of the phase so far."""

    def __init__(self, owner: "BlockKV", index: int):
        self.owner, self.index = owner, index

    def update(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
        own = self.owner.blocks[self.index]
        own.append((key_states, value_states))
        window = self.owner.window
        keys = torch.cat([window[2 * self.index]] + [k for k, _ in own], dim=2)
        values = torch.cat([window[2 * self.index + 1]] + [v for _, v in own], dim=2)
        return keys, values


class BlockKV:
    """The cache a phase's forwards run over: a pool's window [2 * layers, B, H, S, d] (read only)
    and the blocks the phase's forwards add, kept out of the pool. A phase writes the pool once, at
    its end (`commit_block`): inductor turns that one write into an in-place store, where a write
    per layer into the pool would make it copy the pool's window (graphs of the KV cache as inputs)."""

    def __init__(self, window: Tensor):
        self.window = window
        self.blocks: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(window.shape[0] // 2)]
        self.layers = [_BlockLayer(self, i) for i in range(window.shape[0] // 2)]

    def block(self, n: int) -> Tensor:
        """The n-th block of the phase, every layer's keys and values: [2 * layers, B, H, Q_n, d]."""
        return torch.stack([t for layer in self.blocks for t in layer[n]])


def block_mask(committed: Tensor, visible: Tensor, dtype: torch.dtype) -> Tensor:
    """Float mask [B, 1, Q, S + K] over [window slots, block slots]: a query sees its row's
    committed window slots (committed [B, S] bool) and the block slots `visible` ([B, Q, K] bool)
    allows."""
    B, Q, K = visible.shape
    allowed = torch.cat([committed.unsqueeze(1).expand(B, Q, committed.shape[1]), visible], dim=-1)
    return float_mask(allowed, dtype).unsqueeze(1)


def commit_block(kv: Tensor, lengths: Tensor, block: Tensor, src: Tensor, count: Tensor) -> None:
    """Per row b, store block slots src[b, :count[b]] after its committed tokens and grow lengths[b]
    by count[b]. kv: the whole pool [2 * layers, R, H, L, d]; lengths: [B] (rows [0, B) of it);
    block: [2 * layers, B, H, K, d]; src: [B, A]. Slots past count[b] are stored too (past the row's
    new length, where nothing reads them): one gather and one indexed store for every layer."""
    n, B, H, _, d = block.shape
    A = src.shape[1]
    moved = block.gather(3, src.view(1, B, 1, A, 1).expand(n, B, H, A, d))       # [n, B, H, A, d]
    dst = lengths.unsqueeze(1) + arange(A, kv.device)                             # [B, A]
    rows = arange(B, kv.device).unsqueeze(1).expand(B, A)
    kv[:, rows, :, dst] = moved.permute(1, 3, 0, 2, 4)                            # [B, A, n, H, d]
    lengths += count


@dataclass(frozen=True)
class DraftSpec:
    """The static part of a draft phase (what one graph is specialised on besides shapes)."""

    layout: TreeLayout
    config: TreeConfig
    vocab_limit: int
    embeddings: int      # draft embedding rows: ids at or past them (padded target vocab) are fed as 0
    temperature: float
    dtype: torch.dtype


def draft_phase(model, spec: DraftSpec, kv: Tensor, window: int, lengths: Tensor, pending: Tensor,
                pending_len: Tensor, causal: Tensor) -> tuple[Tensor, ...]:
    """Feed the pending tokens to the draft and grow one tree per row (draft.py's algorithm at a
    static shape), then commit the fed tokens to the pool. kv: the draft pool [2 * layers, R, H, L, d]
    (rows [0, B) read over their first `window` slots, then written once); lengths: [B] (advanced by
    pending_len); pending: [B, P]; causal: [P, P] bool lower triangle.
    Returns the pruned tree's tensors (tree_tensors order)."""
    lay, cfg = spec.layout, spec.config
    B, P = pending.shape
    device = kv.device
    cache = BlockKV(kv[:, :B, :, :window])
    committed = arange(window, device) < lengths.unsqueeze(1)                   # [B, S]
    # 1. the pending tokens, a causal block after each row's committed tokens
    positions = lengths.unsqueeze(1) + arange(P, device)
    fed = torch.where(pending < spec.embeddings, pending, 0)
    mask = block_mask(committed, causal.expand(B, P, P), spec.dtype)
    last = (pending_len - 1).clamp(min=0)
    logits = models.model_forward(model, cache, fed, positions, mask, True, keep=last)[:, 0]
    # 2. the tree: level 1 from the feed's logits, then one forward per depth (draft.propose); every
    # tree query sees the row's committed slots, its fed tokens and its ancestors' temp slots
    seen = torch.cat([committed, arange(P, device) < pending_len.unsqueeze(1)], dim=1)   # [B, S + P]
    root_lp = _logprobs(logits, spec)
    scores, tokens = root_lp.topk(lay.top_k, dim=-1)                          # [B, K]
    levels_tok, levels_score, levels_mask, fronts = [tokens], [scores], [lay.empty.expand(B, -1, -1)], []
    mask_level = levels_mask[0]
    T = lay.slots
    log_thr = math.log(cfg.threshold) if cfg.threshold > 0 else None
    tree_pos = (lengths + pending_len).unsqueeze(1) + arange(max(1, len(lay.fronts)), device)
    for i, F in enumerate(lay.fronts):                                        # depth i + 2
        start, off = lay.level_start[i], lay.slot_start[i]
        top, front = (scores + lay.chain_bias[start: start + scores.shape[1]]).topk(F, dim=-1)
        front_score = scores.gather(1, front)
        if log_thr is not None:
            front_score = front_score.masked_fill(top < log_thr, NEG_INF)
        front_tok = tokens.gather(1, front)
        front_mask = torch.maximum(mask_level.gather(1, front.unsqueeze(-1).expand(B, F, T)), lay.own[i])
        mask = block_mask(seen, front_mask[..., : off + F] == 0, spec.dtype)
        out = models.model_forward(model, cache, front_tok, tree_pos[:, i: i + 1].expand(B, F), mask, True)
        child_lp, child_tok = _logprobs(out, spec).topk(lay.top_k, dim=-1)    # [B, F, K]
        scores = (front_score.unsqueeze(-1) + child_lp).view(B, -1)
        tokens = child_tok.view(B, -1)
        mask_level = front_mask.index_select(1, lay.child_parent[i])
        levels_tok.append(tokens)
        levels_score.append(scores)
        levels_mask.append(mask_level)
        fronts.append(front)
    if not lay.fronts:
        tree = prune_tree(lay, tokens, scores, lay.empty.expand(B, -1, -1), tokens[:, :0], cfg.max_nodes)
    else:
        tree = prune_tree(lay, torch.cat(levels_tok, 1), torch.cat(levels_score, 1), torch.cat(levels_mask, 1),
                          torch.cat(fronts, 1), cfg.max_nodes)
    commit_block(kv, lengths, cache.block(0), arange(P, device).expand(B, P), pending_len)
    return tree_tensors(tree)


def _logprobs(logits: Tensor, spec: DraftSpec) -> Tensor:
    logits = logits[..., : spec.vocab_limit]
    if spec.temperature > 0:
        logits = logits / spec.temperature
    return torch.log_softmax(logits, dim=-1, dtype=torch.float32)


@dataclass(frozen=True)
class VerifySpec:
    depth: int              # the tree's depth (0: a plain target step)
    drafted: bool           # the draft phase ran this step (it saw every pending token)
    temperature: float
    top_p: float
    top_k: int
    dtype: torch.dtype


def tree_tensors(tree: DraftTree) -> tuple:
    """A DraftTree as the tuple of its tensors (what crosses a graph boundary); DraftTree(*t) rebuilds it."""
    return (tree.tokens, tree.parents, tree.depths, tree.scores, tree.valid, tree.ancestors, tree.rank)


def verify_phase(model, spec: VerifySpec, kv: Tensor, window: int, lengths: Tensor, tree_t: tuple, last: Tensor,
                 pending: Tensor, pending_len: Tensor, produced: Tensor, active: Tensor,
                 uniforms: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The target over [last token, tree nodes] (rows [0, B) of its pool, their first `window`
    slots), then acceptance, commit and the slot state's update, all in place (kv, lengths, last,
    pending, pending_len, produced). Returns (host, length, nodes): host = [B, 2 + A + 1] (accepted
    length, node count, the step's tokens), the one tensor the host reads; length/nodes: the
    acceptance (the budget calibration reads them)."""
    tree = DraftTree(*tree_t)
    B = last.shape[0]
    device = kv.device
    cache = BlockKV(kv[:, :B, :, :window])
    tokens = torch.cat([last.unsqueeze(1), tree.tokens], dim=1)
    positions = verify_positions(tree, lengths)
    committed = arange(window, device) < lengths.unsqueeze(1)
    mask = block_mask(committed, verify_visibility(tree), spec.dtype)
    logits = models.model_forward(model, cache, tokens, positions, mask, True)
    if spec.temperature > 0:
        probs = target_probs(logits, spec.temperature, spec.top_p, spec.top_k)
        choice = inverse_cdf(probs, slot_uniforms(uniforms, produced, tree))
    else:
        choice = logits.argmax(-1)
    acc = accept(tree, choice, spec.depth)
    count = (acc.length + 1) * active
    src = acc.slots if acc.slots is not None else arange(1, device).expand(B, 1)
    commit_block(kv, lengths, cache.block(0), src, count)
    width = acc.tokens.shape[1]
    if spec.drafted:
        pending[:, :width] = acc.tokens
        pending_len.copy_(count)
    else:
        index = pending_len.unsqueeze(1) + arange(width, device)
        pending.scatter_(1, index, acc.tokens)
        pending_len += count
    last.copy_(acc.bonus)
    produced += acc.length + 1
    host = torch.cat([acc.length.unsqueeze(1), tree.num_nodes.unsqueeze(1), acc.tokens], 1)
    return host, acc.length, acc.nodes


def compile_mode(setting: str, device: torch.device) -> str | None:
    """The torch.compile mode `--compile` means on this device, or None for no compiling.
    on: "reduce-overhead" (CUDA graphs) on CUDA, inductor's "default" elsewhere; auto: on for CUDA,
    off on a CPU (where the bench shows compiling does not pay: docs/benchmarks.md)."""
    if setting not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {setting!r}")
    if setting in ("off", "static") or (setting == "auto" and device.type != "cuda"):
        return None
    return "reduce-overhead" if device.type == "cuda" else "default"


def step_graphs(setting: str, target, draft) -> "PhaseGraphs | None":
    """The decoder's PhaseGraphs for `--compile` (None: the eager engine at exact shapes).
    "static" runs the static phases without compiling (what the compiled graphs compute)."""
    from .errors import ModelPairError
    from .models import model_device

    device = model_device(target)
    mode = compile_mode(setting, device)
    if mode is None and setting != "static":
        return None
    for role, model in (("target", target), ("draft", draft)):
        why = graph_blocker(model)
        if why is not None:
            if setting == "auto":
                return None
            raise ModelPairError(f"--compile {setting}: the {role} cannot run static step phases: {why}")
    return PhaseGraphs(mode)


def spare_rows(graphs: "PhaseGraphs | None") -> int:
    """Pool rows kept past the last slot when steps are compiled: a phase slices rows [0, B) of a
    pool, and a graph first traced with B equal to the pool's rows carries the guard `pool rows ==
    B` (from the slice's contiguity check), so the next, smaller bucket recompiled it (21-27 s on
    a CPU, mid-run). With one row no slot ever uses, B is always below the pool's rows."""
    return 1 if graphs is not None and graphs.mode is not None else 0


class PhaseGraphs:
    """The compiled (or eager) phase functions of one engine, built lazily per static key, with
    the seconds each first call (the compile) took."""

    def __init__(self, mode: str | None):
        self.mode = mode
        self._fns: dict = {}
        self.compile_s: dict = {}

    def get(self, key, fn):
        """The callable for `key`: `fn` itself when eager, else torch.compile(fn, fullgraph=True)."""
        entry = self._fns.get(key)
        if entry is None:
            if self.mode is None:
                entry = fn
            else:
                import torch._dynamo

                torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
                # torch's automatic dynamic shapes: a phase first compiles for its first sizes; a
                # size seen changing recompiles it symbolic once, and that graph serves every later
                # value (a compile costs seconds to minutes; a size-specialised kernel saves
                # microseconds). dynamic=True from the first call measured far slower kernels here.
                # With CUDA graphs each bucket is still its own captured graph (cudagraph trees
                # record one per distinct shape, milliseconds each): the buckets bound how many.
                entry = torch.compile(_own_frame(fn), fullgraph=True, mode=self.mode)
            self._fns[key] = entry
        return entry

    def run(self, key, fn, *args):
        """Call the phase for `key`; the first call of each distinct shape is timed as its compile."""
        shape_key = (key,) + tuple(tuple(a.shape) for a in args if isinstance(a, Tensor))
        first = shape_key not in self.compile_s
        t0 = time.perf_counter() if first else 0.0
        out = run_graph(self.get(key, fn), *args)
        if first:
            self.compile_s[shape_key] = time.perf_counter() - t0
        return out


def _own_frame(fn):
    """`fn` behind a function with a code object of its own. Dynamo keeps compiled graphs, guards
    and its automatic-dynamic record per code object, and every phase is a partial of the same two
    functions: without this, all phases and shapes would share one cache (each call checking every
    other phase's guards, a size seen changing in one making it dynamic in all)."""
    def call(*args):
        return fn(*args)
    return types.FunctionType(call.__code__.replace(), call.__globals__, f"phase_{id(fn):x}", None, call.__closure__)


def run_graph(fn, *args):
    """Where a step launches a phase (profiling.StepProfiler counts the calls here)."""
    return fn(*args)


def is_compiled(fn) -> bool:
    return not isinstance(fn, partial)


def inductor_cache_dir() -> str:
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or f"/tmp/torchinductor_{os.environ.get('USER', 'user')}"
