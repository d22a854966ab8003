"""GPU (or CPU) stage: preprocessed rows → captions + per-row acceptance statistics.

`CaptionWorker` is a plain callable class: Ray Data runs it in an actor pool
(`map_batches(CaptionWorker, compute=ActorPoolStrategy(...), batch_format="pyarrow")`), and
tests call it directly. It loads the target, the draft and one `SpeculativeDecoder` once, in
__init__; each call decodes the batch's ok rows together and returns exactly one output row per
input row, in input order (error rows from preprocessing pass through with null statistics).
Model or decoder failures (OOM, bad pair) raise: they are not a property of one row.
"""
from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import torch

from decoding.loading import load_llava, parse_dtype  # safetensors only; refuses remote code and pickle
from workers import storage
from workers.drill import Drill
from workers.schema import OUTPUT_FIELDS, STATUS_OK, carry_row_index, output_schema


class CaptionWorker:
    """Caption preprocessed rows with speculative decoding.

    Args:
        target, draft: local dirs or s3:// prefixes of LLaVA checkpoints (safetensors).
        id_column: copied to the output unchanged.
        max_new_tokens, temperature, top_p: decoding options (temperature 0 = greedy, exact).
        tree: dict of `decoding.TreeConfig` fields (None: defaults).
        device: "auto" (cuda when available), "cpu" or "cuda".
        dtype: "auto" (fp16 on cuda, fp32 on cpu) or a name decoding.loading.parse_dtype knows.
        torch_threads: intra-op threads on CPU (None: leave torch's default).

    Fault drills in tests (an event log, a delay after each batch) are switched on by environment
    variables, never by arguments: see workers/drill.py.
    """

    def __init__(self, target: str, draft: str, *, id_column: str = "id", max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, tree: dict | None = None,
                 s3_endpoint: str | None = None, device: str = "auto", dtype: str = "auto",
                 torch_threads: int | None = None, seed: int | None = None):
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
        self.target = load_llava(target_dir, torch_dtype, self.device)
        self.draft = load_llava(draft_dir, torch_dtype, self.device)
        self.tokenizer = AutoProcessor.from_pretrained(target_dir).tokenizer
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else 0
        self.tree = TreeConfig(**(tree or {}))
        self.decoder = SpeculativeDecoder(self.target, self.draft, tree=self.tree)
        self.id_column = id_column
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.generator = None
        if temperature > 0 and seed is not None:
            self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.drill = Drill()
        self.rows_decoded = 0  # ok rows this actor decoded (read by tests and benchmarks)
        self.drill.event("init")

    def options(self) -> dict:
        return dict(tree=asdict(self.tree), max_new_tokens=self.max_new_tokens,
                    temperature=self.temperature, top_p=self.top_p, device=str(self.device))

    def _pad_batch(self, ids: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad rows to one length: (input_ids [B, T], attention_mask [B, T])."""
        T = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), T), dtype=torch.long)
        for b, row in enumerate(ids):
            input_ids[b, T - len(row):] = torch.from_numpy(np.array(row, dtype=np.int64))
            mask[b, T - len(row):] = 1
        return input_ids, mask

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        drill_ids = batch.column(self.id_column).to_pylist() if self.drill.wants_ids else None
        self.drill.event("start", drill_ids)
        status = batch.column("status").to_pylist()
        ok = [i for i in range(n) if status[i] == STATUS_OK]
        columns: dict[str, list] = {f.name: [None] * n for f in OUTPUT_FIELDS}
        columns["status"] = status
        columns["error"] = batch.column("error").to_pylist()
        if ok:
            ids_col = batch.column("input_ids")
            ids = [ids_col[i].values.to_numpy(zero_copy_only=False) for i in ok]
            input_ids, attention_mask = self._pad_batch(ids)
            pix = batch.column("pixel_values").combine_chunks()
            width = pix.type.list_size
            flat = pix.values.to_numpy(zero_copy_only=False).reshape(n, width)[ok]
            shape = self._pixel_shape(width)
            pixel_values = torch.from_numpy(np.ascontiguousarray(flat)).reshape(len(ok), *shape)
            pixel_values = pixel_values.to(self.device, next(self.target.parameters()).dtype)
            start = time.perf_counter()
            result = self.decoder.generate(
                input_ids, attention_mask, pixel_values, max_new_tokens=self.max_new_tokens,
                temperature=self.temperature, top_p=self.top_p, generator=self.generator)
            elapsed = time.perf_counter() - start
            captions = self.tokenizer.batch_decode(result.sequences, skip_special_tokens=True)
            for j, i in enumerate(ok):
                s = result.stats[j]
                columns["caption"][i] = captions[j].strip()
                columns["new_tokens"][i] = s.new_tokens
                columns["target_forwards"][i] = s.target_forwards
                columns["mean_accepted"][i] = s.mean_accepted
                columns["accepted_lengths"][i] = list(s.accepted_lengths)
                columns["draft_tokens"][i] = s.draft_tokens
                columns["tree_nodes_mean"][i] = (sum(s.tree_nodes) / len(s.tree_nodes)) if s.tree_nodes else 0.0
                # The batch is decoded together: every row reports the batch's wall time.
                columns["decode_s"][i] = elapsed
            self.rows_decoded += len(ok)
        self.drill.after_batch()
        self.drill.event("return", drill_ids)
        id_col = batch.column(self.id_column).combine_chunks()
        schema = output_schema(self.id_column, id_col.type)
        arrays = [id_col] + [pa.array(columns[f.name], f.type) for f in OUTPUT_FIELDS]
        return carry_row_index(pa.Table.from_arrays(arrays, schema=schema), batch)

    def _pixel_shape(self, width: int) -> tuple[int, int, int]:
        vision = self.target.config.vision_config
        channels = getattr(vision, "num_channels", 3)
        side = int(round((width / channels) ** 0.5))
        if channels * side * side != width:
            raise ValueError(f"pixel_values rows of {width} floats are not {channels} square channels")
        return channels, side, side
