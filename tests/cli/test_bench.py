"""`specllava bench --quick --json` emits one valid JSON object; the budget picks from its grid."""
from __future__ import annotations

import copy
import json

import torch

from decoding import SpeculativeDecoder, TreeConfig
from decoding.budget import calibrate_tau, choose_tree, forward_latency
from decoding.testing import make_tiny_llava
from jobs.cli import main
from tests.helpers import random_batch

RUN_KEYS = {"method", "batch_size", "tokens_per_s", "mean_accepted", "target_forwards_per_token", "match_rate"}


def test_bench_quick_json(tmp_path, capsys):
    chart = tmp_path / "bench.png"
    assert main(["bench", "--quick", "--json", "--chart", str(chart)]) == 0
    out = capsys.readouterr().out
    report = json.loads(out)                      # exactly one JSON object, nothing else on stdout
    assert isinstance(report["device"], str) and report["dtype"] == "float32"  # the one dtype vocabulary
    methods = {(r["method"], r["batch_size"]) for r in report["runs"]}
    assert methods == {("target_greedy", 1), ("hf_assisted", 1), ("static_tree", 1), ("dynamic_tree", 1),
                       ("target_greedy", 2), ("static_tree", 2), ("dynamic_tree", 2)}
    for r in report["runs"]:
        assert set(r) == RUN_KEYS
        assert r["tokens_per_s"] > 0
        assert r["match_rate"] == 1.0             # fp32: every method reproduces target greedy
        if r["method"] == "target_greedy":
            assert r["mean_accepted"] == 1.0 and r["target_forwards_per_token"] == 1.0
    assert chart.stat().st_size > 1000


def test_bench_bad_methods_exit_2(capsys):
    assert main(["bench", "--quick", "--methods", "nope"]) == 2
    assert "unknown --methods" in capsys.readouterr().err


def _pair():
    target = make_tiny_llava(seed=0, image_token_id=95)
    draft = copy.deepcopy(target)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in draft.model.language_model.parameters():
            p.add_(0.2 * p.std() * torch.randn(p.shape, generator=g))
    return target, draft


def test_calibrated_tau_grows_with_budget_and_depth():
    target, draft = _pair()
    ids, mask, pixels = random_batch(target, 2, [3, 6], seed=0)
    decoder = SpeculativeDecoder(target, draft, TreeConfig(threshold=0.0))
    tau = calibrate_tau(decoder, ids, mask, pixels, 24, (1, 4, 16), (1, 3, 6))
    assert decoder.tree == TreeConfig(threshold=0.0) and decoder.step_observer is None   # restored
    for d in (1, 3, 6):
        assert 1.0 <= tau[(1, d)] <= tau[(4, d)] <= tau[(16, d)] <= d + 1
    for n in (1, 4, 16):
        assert tau[(n, 1)] <= tau[(n, 3)] <= tau[(n, 6)]


def test_choose_tree_picks_from_grid():
    target, draft = _pair()
    ids, mask, pixels = random_batch(target, 1, [4], seed=1)
    decoder = SpeculativeDecoder(target, draft)
    report = choose_tree(decoder, ids, mask, pixels, max_new_tokens=12, max_nodes_grid=(2, 8), depth_grid=(2, 4))
    assert (report.tree.max_nodes, report.tree.max_depth) in report.tau
    assert set(report.verify_s) == {2, 8}
    assert json.dumps(report.to_dict())


def test_forward_latency_positive():
    target, _ = _pair()
    lat = forward_latency(target, sizes=(1, 4), prefix_len=8, repeats=1)
    assert set(lat) == {1, 4} and all(v > 0 for v in lat.values())
