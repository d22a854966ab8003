"""Count what a decode step launches: aten ops and host syncs, per phase.

Seconds depend on the machine; the number of ops a step dispatches and the number of times the
host waits for the device do not, and at the batch sizes where speculation pays they are what a
step costs (each op is a kernel launch on a GPU; each sync stops the host from running ahead).

    with StepProfiler(decoder) as prof:
        engine.step()
    prof.report()   # {"draft_forward": {...}, "verify_forward": {...}, "other": {...}}

Phases: ops dispatched inside a draft model forward, inside the target's forward, and everything
else (tree building, masks, acceptance, cache bookkeeping). A model forward is what
`models.model_forward` runs; the profiler wraps that one function.

Host syncs counted: ops whose result the host must read (`_local_scalar_dense`: `.item()`,
`bool(t)`, `int(t)`; ops with data-dependent output shapes such as `nonzero`), reads of a tensor's
values by `Tensor.tolist()` (on a CPU tensor that dispatches nothing, so it is counted by a
wrapper), and `torch.cuda.synchronize`. `view` ops (slices, reshapes, expands: no kernel on any
device) are counted apart from the others.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive",
                      "unique_dim", "repeat_interleave", "item"})
PHASES = ("draft_forward", "verify_forward", "other")


class _Counter(TorchDispatchMode):
    def __init__(self, profiler: "StepProfiler"):
        super().__init__()
        self.profiler = profiler

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.profiler._count(func)
        return func(*args, **(kwargs or {}))


class StepProfiler:
    """Context manager counting ops and syncs of everything run inside it, split by phase."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.phase = "other"
        self.ops: Counter = Counter()        # phase -> ops that are not views
        self.views: Counter = Counter()      # phase -> view ops
        self.syncs: Counter = Counter()      # phase -> host syncs
        self.forwards: Counter = Counter()   # phase -> model forwards
        self.graphs: Counter = Counter()     # phase -> compiled phase graphs launched (graphs.py)
        self.by_name: Counter = Counter()    # (phase, op name) -> count

    def _count(self, func) -> None:
        name = func.overloadpacket.__name__
        if getattr(func, "is_view", False):
            self.views[self.phase] += 1
        else:
            self.ops[self.phase] += 1
            self.by_name[(self.phase, name)] += 1
        if name in SYNC_OPS:
            self.syncs[self.phase] += 1

    def _sync(self) -> None:
        self.syncs[self.phase] += 1

    def __enter__(self) -> "StepProfiler":
        import decoding.models as models

        self._models = models
        self._forward = models.model_forward
        target = self.decoder.target
        profiler = self

        def counted_forward(model, *args, **kwargs):
            outer = profiler.phase
            profiler.phase = "verify_forward" if model is target else "draft_forward"
            profiler.forwards[profiler.phase] += 1
            try:
                return profiler._forward(model, *args, **kwargs)
            finally:
                profiler.phase = outer

        models.model_forward = counted_forward
        import decoding.graphs as graphs

        self._graphs = graphs
        self._run_graph = graphs.run_graph

        def counted_graph(fn, *args):
            if not graphs.is_compiled(fn):        # static phases run eagerly: their ops are counted as usual
                return profiler._run_graph(fn, *args)
            profiler.graphs[profiler.phase] += 1  # one launch (a CUDA graph replay on a GPU); its kernels are not
            from torch.utils._python_dispatch import _disable_current_modes   # dispatched one by one

            with _disable_current_modes():
                return profiler._run_graph(fn, *args)

        graphs.run_graph = counted_graph
        self._tolist = torch.Tensor.tolist
        self._cuda_sync = torch.cuda.synchronize

        def tolist(tensor):
            profiler._sync()
            return profiler._tolist(tensor)

        def cuda_sync(*args, **kwargs):
            profiler._sync()
            return profiler._cuda_sync(*args, **kwargs)

        torch.Tensor.tolist = tolist
        torch.cuda.synchronize = cuda_sync
        self._mode = _Counter(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        torch.Tensor.tolist = self._tolist
        torch.cuda.synchronize = self._cuda_sync
        self._models.model_forward = self._forward
        self._graphs.run_graph = self._run_graph

    def report(self, steps: int = 1, top: int = 8) -> dict:
        """Per phase, per step: ops (not views), views, host syncs, model forwards; and the most
        frequent ops outside the model forwards."""
        out = {phase: {"ops": round(self.ops[phase] / steps, 1), "views": round(self.views[phase] / steps, 1),
                       "syncs": round(self.syncs[phase] / steps, 2), "forwards": round(self.forwards[phase] / steps, 2),
                       "graphs": round(self.graphs[phase] / steps, 2)}
               for phase in PHASES}
        other = Counter({name: n for (phase, name), n in self.by_name.items() if phase == "other"})
        out["other"]["top_ops"] = {name: round(n / steps, 1) for name, n in other.most_common(top)}
        out["syncs_per_step"] = round(sum(self.syncs.values()) / steps, 2)
        return out
