"""GPU (or CPU) stage: preprocessed rows → captions + per-row acceptance statistics.

`CaptionWorker` is a callable class: Ray Data runs it in an actor pool
(`map_batches(CaptionWorker, compute=ActorPoolStrategy(...), batch_format="pyarrow")`) with
several input batches in flight per actor. It loads the target, the draft and one decoding
engine once, in __init__; a `ContinuousBatcher` (workers/batcher.py) keeps up to `batch_size`
rows decoding and admits rows of the next batches as others finish. Each call returns exactly
one output row per input row, in input order, once the batch's last row is done (error rows from
preprocessing pass through with null statistics). Tests and scripts call `caption(batch)`.
Model or decoder failures (OOM, bad pair) raise: they are not a property of one row.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import torch

from decoding.engine import SEED_BITS, row_seed
from decoding.loading import load_model, parse_dtype  # safetensors only; refuses remote code and pickle
from workers import storage
from workers.batcher import ContinuousBatcher, RowRequest
from workers.drill import PAUSE_POLL_S, Drill
from workers.schema import OUTPUT_FIELDS, STATUS_OK, carry_row_index, one_line, output_schema


def upload_pixels(flat, ok: list[int], shape: tuple[int, ...], device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """Rows `ok` of `flat` (a float32 numpy array [rows, C*H*W], often read-only over Arrow
    memory) as one [len(ok), *shape] tensor on `device` in `dtype`, with one host copy.

    On CUDA the rows are gathered into pinned memory and uploaded with non_blocking=True, so the
    actor's event-loop thread does not wait for the transfer (the copy is ordered on the stream
    before the engine's next use; the caching host allocator keeps the pinned block until the copy
    is done); the dtype is converted on the device. On a CPU: the gather, then the conversion.
    """
    if device.type != "cuda":
        return torch.from_numpy(flat[ok]).reshape(len(ok), *shape).to(device, dtype)  # one copy
    host = gather_rows(flat, ok, pin=True)
    return host.reshape(len(ok), *shape).to(device, non_blocking=True).to(dtype)


def gather_rows(flat, ok: list[int], *, pin: bool) -> torch.Tensor:
    """Rows `ok` of a float32 numpy array as a new (pinned when `pin`) float32 tensor: one copy,
    written in place by numpy (so a read-only `flat` is only read)."""
    host = torch.empty((len(ok), flat.shape[1]), dtype=torch.float32, pin_memory=pin)
    np.take(flat, ok, axis=0, out=host.numpy(), mode="clip")  # mode "raise" would buffer the copy
    return host


class CaptionWorker:
    """Caption preprocessed rows with speculative decoding.

    Args:
        target, draft: local dirs or s3:// prefixes of LLaVA checkpoints (safetensors).
        id_column: copied to the output unchanged.
        max_new_tokens, temperature, top_p, top_k: decoding options (temperature 0 = greedy, exact;
            top_k None = what the target's `generate` applies, 0 = off).
        seed: sampling seed; a row's caption then depends only on (seed, row id).
        batch_size: rows decoding at once (the engine admits new rows as others finish).
        tree_budget: "auto" measures, on the first rows this actor sees, which tree shape (or no
            drafting) gives the most tokens/s at each active batch size up to batch_size
            (decoding.budget.choose_table) and uses that table; "off" uses `tree` at every step.
        tree: dict of `decoding.TreeConfig` fields (None: defaults).
        compile: how steps run (decoding/graphs.py): "on" static shapes and compiled step graphs,
            "off" op by op, "auto" on for CUDA only. Graphs compile on first use of a batch bucket
            (during the budget calibration, when it runs); `startup` reports their seconds.
        device: "auto" (cuda when available), "cpu" or "cuda".
        dtype: "auto" (bf16 on cuda, fp32 on cpu) or a name decoding.loading.parse_dtype knows.
        torch_threads: intra-op threads on CPU (None: leave torch's default).
        kv_memory_gb: the KV cache's memory (GiB) on any device; None: on CUDA 90% of the memory
            free once the weights are loaded, on a CPU no plan (the cache grows as rows need).
            With a plan the engine's pools are allocated once and a row is admitted only when its
            whole decode fits (decoding/capacity.py): `batch_size` is then an upper bound.
        max_prompt_tokens: the longest prompt (image tokens included) the plan must hold; None: the
            target's image tokens + 128.
        budget_window: with tree_budget="auto", the actor compares every `budget_window` steps at a
            calibrated batch size with the table (decoding.budget.DriftMonitor) and, when their step
            times or acceptance drifted beyond 30%, drains its batch and measures the table again
            (at most 3 times, the window doubling each time); 0 switches the check off.

    Fault drills in tests (an event log, a delay after each batch, a pause file) are switched on by environment
    variables, never by arguments: see workers/drill.py.
    """

    def __init__(self, target: str, draft: str, *, id_column: str = "id", max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int | None = None,
                 tree: dict | None = None, s3_endpoint: str | None = None, device: str = "auto",
                 dtype: str = "auto", torch_threads: int | None = None, seed: int | None = None,
                 batch_size: int = 8, tree_budget: str = "off", kv_memory_gb: float | None = None,
                 max_prompt_tokens: int | None = None, compile: str = "off", budget_report: str | None = None,
                 budget_window: int = 64):
        from transformers import AutoProcessor

        from decoding import SpeculativeDecoder, TreeConfig

        if torch_threads:
            torch.set_num_threads(torch_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        torch_dtype = parse_dtype(dtype, self.device)
        target_dir = storage.local_copy(target, s3_endpoint)
        draft_dir = storage.local_copy(draft, s3_endpoint)
        self.target = load_model(target_dir, torch_dtype, self.device)
        self.draft = load_model(draft_dir, torch_dtype, self.device)
        self.tokenizer = AutoProcessor.from_pretrained(target_dir).tokenizer
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else 0
        self.tree = TreeConfig(**(tree or {}))
        self.decoder = SpeculativeDecoder(self.target, self.draft, tree=self.tree, compile=compile)
        self.id_column = id_column
        if tree_budget not in ("auto", "off"):
            raise ValueError(f"tree_budget must be 'auto' or 'off', got {tree_budget!r}")
        self.plan = self._plan(kv_memory_gb, max_prompt_tokens, max_new_tokens, batch_size, tree_budget)
        plan_kwargs = {} if self.plan is None else dict(max_rows=self.plan.rows, max_length=self.plan.length,
                                                         trees=self._trees)
        engine = self.decoder.engine(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     top_k=top_k, **plan_kwargs)
        self.seed = seed
        # The batcher owns the engine (and replaces it with a fresh one after a model error).
        rows = batch_size if self.plan is None else self.plan.rows
        self.batcher = ContinuousBatcher(engine, max_rows=rows, pad_token_id=self.pad_token_id,
                                         torch_threads=torch_threads, step_monitor=self._watch)
        self.batch_size = batch_size
        self.budget_pending = tree_budget == "auto"
        self.budget = None   # the measured table (a dict) once tree_budget="auto" has run
        self.budget_window = budget_window
        self.monitor = None  # decoding.budget.DriftMonitor over the table, once measured
        self.remeasures: list[dict] = []   # {"reason", "budget"} per re-measure, in order
        # Where the measured table is reported (a dir or s3:// prefix; the driver reads it into
        # _run.json and `stats` shows it): OUTPUT/_budget/RUN. None: only the start-up log line.
        self.budget_report = budget_report
        self.s3_endpoint = s3_endpoint
        self.drill = Drill()
        self._drill_lock = None
        self.rows_decoded = 0  # ok rows this actor decoded (read by tests and benchmarks)
        self._compiles_reported = False
        self.drill.event("init")

    def _plan(self, kv_memory_gb, max_prompt_tokens, max_new_tokens: int, batch_size: int, tree_budget: str):
        """The KV plan (decoding/capacity.py), or None (CPU without --kv-memory-gb)."""
        from dataclasses import replace

        from decoding.budget import DEFAULT_SHAPES
        from decoding.capacity import kv_budget, plan_for
        from decoding.models import image_tokens_per_image

        self._trees = [self.tree] + ([replace(self.tree, max_nodes=n, max_depth=d) for n, d in DEFAULT_SHAPES]
                                     if tree_budget == "auto" else [])
        if kv_memory_gb is None and self.device.type != "cuda":
            return None
        budget = int(kv_memory_gb * 2 ** 30) if kv_memory_gb is not None else kv_budget(self.device)
        prompt = max_prompt_tokens or image_tokens_per_image(self.target) + 128
        plan = plan_for(self.decoder, prompt, max_new_tokens, budget, max_rows=batch_size, trees=self._trees)
        print(f"caption actor: KV plan {plan.describe()} for prompts up to {prompt} tokens", flush=True)
        return plan

    def options(self) -> dict:
        o = self.batcher.engine.options
        return dict(tree=asdict(self.tree), max_new_tokens=o.max_new_tokens, temperature=o.temperature,
                    top_p=o.top_p, top_k=o.top_k, device=str(self.device))

    def _requests(self, batch: pa.Table, ok: list[int]) -> list[RowRequest]:
        ids_col = batch.column("input_ids")
        pix = batch.column("pixel_values").combine_chunks()
        width = pix.type.list_size
        flat = pix.values.to_numpy(zero_copy_only=False).reshape(batch.num_rows, width)
        shape = self._pixel_shape(width)
        dtype = next(self.target.parameters()).dtype
        keys = batch.column(self.id_column).to_pylist()
        sampling = self.batcher.engine.options.sampling
        pixels = upload_pixels(flat, ok, shape, self.device, dtype)
        sizes = None
        if len(shape) == 4:   # any-resolution (NeXT): each row's image size picks its tiles
            column = batch.column("image_sizes").to_pylist() if "image_sizes" in batch.column_names else None
            if column is None or any(column[i] is None for i in ok):
                raise ValueError("an any-resolution target needs the preprocess stage's image_sizes column")
            sizes = torch.tensor([column[i] for i in ok], dtype=torch.long, device=self.device)
        requests = []
        for j, i in enumerate(ok):
            seed = None
            if sampling:
                seed = row_seed(self.seed, keys[i]) if self.seed is not None else random.getrandbits(SEED_BITS)
            requests.append(RowRequest(ids_col[i].values.to_numpy(zero_copy_only=False), pixels[j:j + 1], seed,
                                       None if sizes is None else sizes[j:j + 1]))
        return requests

    def _start(self, batch: pa.Table):
        """Submit the batch's ok rows; returns (future, ok indices, drill ids)."""
        drill_ids = batch.column(self.id_column).to_pylist() if self.drill.wants_ids else None
        self.drill.event("start", drill_ids)
        status = batch.column("status").to_pylist()
        ok = [i for i in range(batch.num_rows) if status[i] == STATUS_OK]
        requests = self._requests(batch, ok)
        if self.budget_pending and requests:
            self._calibrate(requests[:8])
        return self.batcher.submit(requests), ok, drill_ids

    def _calibrate(self, requests: list[RowRequest]) -> None:
        """--tree-budget auto: measure the budget table on this device, before decoding (and again
        when the steps drift from it, see `_watch`), and use it."""
        from decoding.budget import DEFAULT_BATCH_SIZES, DriftMonitor, calibration_tokens, choose_table
        from workers.batcher import left_pad

        self.budget_pending = False
        ids, mask = left_pad([r.input_ids for r in requests], self.pad_token_id)
        pixels = torch.cat([r.pixel_values for r in requests])
        image_sizes = torch.cat([r.image_sizes for r in requests]) if requests[0].image_sizes is not None else None
        sizes = sorted({b for b in DEFAULT_BATCH_SIZES if b < self.batch_size} | {self.batch_size})
        options = self.batcher.engine.options
        table = choose_table(self.decoder, ids, mask, pixels, batch_sizes=sizes,
                             max_new_tokens=calibration_tokens(options.max_new_tokens), image_sizes=image_sizes,
                             eos_token_id=options.eos)
        first = self.budget is None
        self.decoder.budget = table
        self.batcher.engine.tree_for = table.lookup
        self.budget = table.to_dict()
        if self.monitor is not None:
            self.monitor.reset(table)
        elif self.budget_window:
            self.monitor = DriftMonitor(table, window=self.budget_window)
        print(f"caption actor: tree budget {describe_budget(table)}", flush=True)
        if first:
            self._report_budget(describe_budget(table))
            self._report_compiles("budget calibration")
            self._compiles_reported = True

    def _watch(self, rows: int, seconds: float, result) -> None:
        """The batcher's step monitor (decode thread): a step's time and acceptance against the table;
        on drift, drain the batch and measure the table again (`_remeasure`)."""
        if self.monitor is None:
            return
        reason = self.monitor.observe(rows, seconds, result.running_accepted)
        if reason is not None:
            print(f"caption actor: tree budget drifted {reason}: draining the batch to measure it again",
                  flush=True)
            self.batcher.request_drain(lambda samples: self._remeasure(samples, reason))

    def _remeasure(self, samples: list[RowRequest], reason: str) -> None:
        """Decode thread, engine empty: measure the table again on queued (or recent) rows. A failure
        keeps the table in use and is said in the log; it never fails a batch."""
        t0 = time.perf_counter()
        try:
            if not samples:
                raise ValueError("no rows to measure on")
            self._calibrate(samples[:8])
        except Exception as exc:  # noqa: BLE001 - the old table still decodes losslessly
            print(f"caption actor: could not measure the tree budget again ({one_line(exc, 200)}); keeping "
                  f"{describe_budget(self.decoder.budget)}", flush=True)
            return
        line = describe_budget(self.decoder.budget)
        self.remeasures.append({"reason": reason, "budget": line, "seconds": round(time.perf_counter() - t0, 2)})
        self._report_budget(line)

    def _report_budget(self, line: str) -> None:
        """Write this actor's measured table to `budget_report` (best effort: a report that cannot
        be written is said in the actor's log, never a reason to stop decoding)."""
        if not self.budget_report:
            return
        import json
        import os
        import socket

        record = {"actor": f"{socket.gethostname()}:{os.getpid()}", "device": str(self.device),
                  "budget": line, "table": self.budget, "remeasures": self.remeasures}
        try:
            fs, root = storage.resolve(self.budget_report, self.s3_endpoint)
            fs.create_dir(root, recursive=True)
            path = f"{root}/{socket.gethostname()}-{os.getpid()}.json"
            storage.write_bytes_atomic(fs, path, json.dumps(record).encode())
        except (OSError, ValueError) as exc:
            print(f"caption actor: could not report the tree budget to {storage.redact(self.budget_report)}: "
                  f"{one_line(exc, 200)}", flush=True)

    def _report_compiles(self, during: str) -> None:
        """The start-up log's line on compiled step graphs (--compile on): how many, how long."""
        from decoding.graphs import inductor_cache_dir

        graphs = self.decoder.graphs
        if graphs is not None and graphs.mode is not None and graphs.compile_s:
            print(f"caption actor: compiled {len(graphs.compile_s)} step graphs in "
                  f"{sum(graphs.compile_s.values()):.1f} s during the {during} (mode {graphs.mode}; more compile "
                  f"on first use of another batch bucket; inductor cache {inductor_cache_dir()})", flush=True)

    def _finish(self, batch: pa.Table, ok: list[int], results: list, drill_ids) -> pa.Table:
        n = batch.num_rows
        columns: dict[str, list] = {f.name: [None] * n for f in OUTPUT_FIELDS}
        columns["status"] = batch.column("status").to_pylist()
        columns["error"] = batch.column("error").to_pylist()
        if ok:
            captions = self.tokenizer.batch_decode([r.tokens for r in results], skip_special_tokens=True)
            for j, i in enumerate(ok):
                s = results[j].stats
                columns["caption"][i] = captions[j].strip()
                columns["new_tokens"][i] = s.new_tokens
                columns["target_forwards"][i] = s.target_forwards
                columns["mean_accepted"][i] = s.mean_accepted
                columns["accepted_lengths"][i] = list(s.accepted_lengths)
                columns["draft_tokens"][i] = s.draft_tokens
                columns["tree_nodes_mean"][i] = (sum(s.tree_nodes) / len(s.tree_nodes)) if s.tree_nodes else 0.0
                columns["decode_s"][i] = results[j].decode_s
            self.rows_decoded += len(ok)
            if not self._compiles_reported:
                self._compiles_reported = True
                self._report_compiles("first batch")
        self.drill.event("return", drill_ids)
        id_col = batch.column(self.id_column).combine_chunks()
        schema = output_schema(self.id_column, id_col.type)
        arrays = [id_col] + [pa.array(columns[f.name], f.type) for f in OUTPUT_FIELDS]
        return carry_row_index(pa.Table.from_arrays(arrays, schema=schema), batch)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        """Ray Data's entry point: several calls wait here at once while the batcher decodes."""
        future, ok, drill_ids = self._start(batch)
        results = await asyncio.wrap_future(future)
        if self.drill.batch_delay_s:   # drills: returns one batch per delay, as a serial actor would
            if self._drill_lock is None:
                self._drill_lock = asyncio.Lock()
            async with self._drill_lock:
                await asyncio.sleep(self.drill.batch_delay_s)
        while self.drill.paused:
            await asyncio.sleep(PAUSE_POLL_S)
        return self._finish(batch, ok, results, drill_ids)

    def caption(self, batch: pa.Table) -> pa.Table:
        """The same, blocking (tests, scripts, one batch at a time)."""
        future, ok, drill_ids = self._start(batch)
        results = future.result()
        self.drill.after_batch()
        return self._finish(batch, ok, results, drill_ids)

    def _pixel_shape(self, width: int) -> tuple[int, ...]:
        """[C, H, W] of a row's pixel_values, or [tiles, C, H, W] for an any-resolution target."""
        from decoding.families import adapter

        vision = self.target.config.vision_config
        channels = getattr(vision, "num_channels", 3)
        if adapter(self.target).anyres:
            side = vision.image_size
            tiles, rest = divmod(width, channels * side * side)
            if rest or not tiles:
                raise ValueError(f"pixel_values rows of {width} floats are not {channels}x{side}x{side} tiles")
            return tiles, channels, side, side
        side = int(round((width / channels) ** 0.5))
        if channels * side * side != width:
            raise ValueError(f"pixel_values rows of {width} floats are not {channels} square channels")
        return channels, side, side


def describe_budget(table) -> str:
    """A budget table in one readable line: 'batch>=1: 8 nodes/depth 4, batch>=8: no drafting'."""
    parts = []
    for entry in table.entries:
        shape = "no drafting" if entry.tree is None else f"{entry.tree.max_nodes} nodes/depth {entry.tree.max_depth}"
        parts.append(f"batch>={entry.batch_size}: {shape}")
    return ", ".join(parts)
