"""`specllava bench --quick --json` emits one valid JSON object with each method's best batch size;
best-of and best-vs-best are checked on hand-made rows; the budget picks from its grid."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image

from decoding import SpeculativeDecoder, TreeConfig
from decoding.budget import BudgetEntry, BudgetTable, calibrate_tau, choose_table, forward_latency, tau_from_steps
from decoding.testing import make_tiny_llava
from jobs.bench import best_lines, best_per_method, parse_batch_sizes, resolve_images, speedup_best_vs_best
from jobs.charts import bench_chart
from jobs.cli import main
from jobs.common import UserError
from tests.helpers import random_batch

RUN_KEYS = {"method", "batch_size", "rows", "tokens", "drafting", "tokens_per_s", "mean_accepted",
            "target_forwards_per_token", "match_rate", "plain", "warmup_s", "wall_s"}
BEST_KEYS = {"method", "batch_size", "tokens_per_s"}


def test_bench_ignore_eos_decodes_every_row_to_length(capsys):
    """--ignore-eos: every method decodes exactly --max-new-tokens per row (and still matches
    target greedy token for token); --max-batches caps the batches per batch size."""
    assert main(["bench", "--quick", "--json", "--chart", "", "--ignore-eos", "--max-new-tokens", "10",
                 "--max-batches", "1", "--images", "4", "--prompt", "Describe this image in detail."]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["ignore_eos"] is True and report["settings"]["max_batches"] == 1
    assert report["settings"]["prompt"] == "Describe this image in detail."
    for r in report["runs"]:
        assert r["rows"] == r["batch_size"]          # one batch each, not all 4 images
        assert r["tokens"] == 10 * r["rows"]         # nobody stopped at EOS
        assert r["match_rate"] == 1.0


def row(method, batch_size, tokens_per_s):
    return {"method": method, "batch_size": batch_size, "tokens_per_s": tokens_per_s, "mean_accepted": 1.0}


def test_bench_quick_json(tmp_path, capsys):
    chart = tmp_path / "bench.png"
    assert main(["bench", "--quick", "--json", "--chart", str(chart)]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)                      # exactly one JSON object, nothing else on stdout
    assert isinstance(report["device"], str) and report["dtype"] == "float32"  # the one dtype vocabulary
    methods = {(r["method"], r["batch_size"]) for r in report["runs"]}
    assert methods == {("target_greedy", 1), ("hf_assisted", 1), ("static_tree", 1), ("dynamic_tree", 1),
                       ("plain_engine", 1), ("target_greedy", 2), ("static_tree", 2), ("dynamic_tree", 2),
                       ("plain_engine", 2)}
    for r in report["runs"]:
        assert set(r) == RUN_KEYS
        assert r["tokens_per_s"] > 0
        assert r["match_rate"] == 1.0             # fp32: every method reproduces target greedy
        if r["method"] in ("target_greedy", "plain_engine"):   # plain decoders: one target forward per token
            assert r["mean_accepted"] == 1.0 and r["target_forwards_per_token"] == 1.0
            assert r["plain"] is True and r["drafting"] is False
        assert 0 < r["warmup_s"] < r["wall_s"]      # the wall time counts the warm-up (compiles) too
    assert report["settings"]["batch_sizes"] == [1, 2] and report["settings"]["images"] == 4
    # best: one entry per method, the maximum of that method's own rows, at a batch size it ran
    assert [b["method"] for b in report["best"]] == ["target_greedy", "hf_assisted", "static_tree", "dynamic_tree",
                                                    "plain_engine"]
    for b in report["best"]:
        assert set(b) == BEST_KEYS
        mine = [r for r in report["runs"] if r["method"] == b["method"]]
        assert b["tokens_per_s"] == max(r["tokens_per_s"] for r in mine)
        assert {"batch_size": b["batch_size"], "tokens_per_s": b["tokens_per_s"]}.items() <= next(
            r for r in mine if r["batch_size"] == b["batch_size"]).items()
    assert next(b for b in report["best"] if b["method"] == "hf_assisted")["batch_size"] == 1   # batch 1 only
    base = next(b for b in report["best"] if b["method"] == "target_greedy")["tokens_per_s"]
    assert set(report["speedup_best_vs_best"]) == {"hf_assisted", "static_tree", "dynamic_tree", "plain_engine"}
    # against the best plain decoder at each batch size, which the JSON names
    plain = {(p["method"], p["batch_size"]): p["tokens_per_s"] for p in report["runs"] if p["plain"]}
    assert {(v["method"], v["batch_size"]) for v in report["vs_best_plain"]} == {
        (m, b) for m, b in methods if m in ("hf_assisted", "static_tree", "dynamic_tree")}
    for v in report["vs_best_plain"]:
        best_plain = max((tps, m) for (m, b), tps in plain.items() if b == v["batch_size"])
        assert (v["plain_tokens_per_s"], v["plain_method"]) == best_plain
    assert report["compile"] == "auto"
    for b in report["best"][1:]:
        assert report["speedup_best_vs_best"][b["method"]] == pytest.approx(b["tokens_per_s"] / base, abs=1e-3)
    assert "best target_greedy" in captured.err and "best dynamic_tree" in captured.err   # the table's best lines
    with Image.open(chart) as image:                      # the --chart PNG reads back, at a sane size
        image.load()
        assert image.format == "PNG" and 600 <= image.size[0] <= 2400 and 300 <= image.size[1] <= 1600


def test_best_per_method_hand_made_rows():
    runs = [row("target_greedy", 1, 96.0), row("dynamic_tree", 1, 166.0),
            row("target_greedy", 8, 300.0), row("dynamic_tree", 8, 480.0),
            row("target_greedy", 128, 1129.0), row("dynamic_tree", 64, 1180.0), row("dynamic_tree", 128, 1100.0),
            row("hf_assisted", 1, 80.0)]     # measured at batch 1 only
    best = best_per_method(runs)
    assert best == [{"method": "target_greedy", "batch_size": 128, "tokens_per_s": 1129.0},
                    {"method": "dynamic_tree", "batch_size": 64, "tokens_per_s": 1180.0},   # not the largest batch
                    {"method": "hf_assisted", "batch_size": 1, "tokens_per_s": 80.0}]
    assert speedup_best_vs_best(best) == {"dynamic_tree": round(1180 / 1129, 3), "hf_assisted": round(80 / 1129, 3)}
    assert speedup_best_vs_best(best)["dynamic_tree"] == 1.045


def test_best_per_method_ties_go_to_the_smaller_batch():
    runs = [row("static_tree", 32, 500.0), row("static_tree", 8, 500.0), row("static_tree", 128, 499.99),
            row("static_tree", 1, 100.0)]
    assert best_per_method(runs) == [{"method": "static_tree", "batch_size": 8, "tokens_per_s": 500.0}]
    assert best_per_method(runs[::-1]) == [{"method": "static_tree", "batch_size": 8, "tokens_per_s": 500.0}]


def test_best_per_method_is_independent_of_row_order_and_empty_safe():
    runs = [row("target_greedy", bs, tps) for bs, tps in ((1, 50.0), (8, 400.0), (32, 350.0))]
    assert best_per_method(runs) == best_per_method(runs[::-1]) == [
        {"method": "target_greedy", "batch_size": 8, "tokens_per_s": 400.0}]
    assert best_per_method([]) == []


def test_speedup_without_baseline_is_empty():
    best = [{"method": "dynamic_tree", "batch_size": 8, "tokens_per_s": 480.0}]
    assert speedup_best_vs_best(best) == {}
    assert best_lines(best, {}) == ["best dynamic_tree      480.0 tok/s at batch 8"]


def test_best_lines_name_batch_and_speedup():
    best = [{"method": "target_greedy", "batch_size": 128, "tokens_per_s": 1000.0},
            {"method": "dynamic_tree", "batch_size": 64, "tokens_per_s": 1180.0}]
    lines = best_lines(best, speedup_best_vs_best(best))
    assert lines[0].split() == ["best", "target_greedy", "1000.0", "tok/s", "at", "batch", "128"]
    assert lines[1].split()[-3:] == ["1.18x", "target_greedy's", "best"] and "at batch 64" in lines[1]


def test_bench_chart_outlines_each_best_bar(tmp_path):
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure

    from jobs.charts import _bench_axes
    runs = [row("target_greedy", 1, 100.0), row("dynamic_tree", 1, 150.0),
            row("target_greedy", 8, 400.0), row("dynamic_tree", 8, 300.0)]
    best = best_per_method(runs)
    ax = Figure().subplots()
    _bench_axes(ax, runs, best, speedup_best_vs_best(best))
    bars = {p.get_gid(): p for p in ax.patches if p.get_gid()}
    assert sorted(bars) == ["dynamic_tree@1", "dynamic_tree@8", "target_greedy@1", "target_greedy@8"]
    black = to_rgba("black")
    outlined = sorted(gid for gid, p in bars.items() if p.get_edgecolor() == black)
    assert outlined == ["dynamic_tree@8", "target_greedy@8"]           # each method's best, only those
    assert bars["target_greedy@8"].get_height() == 400.0
    labels = [t.get_text() for t in ax.texts]
    assert sum("best" in t for t in labels) == 2 and "400\nbest" in labels
    assert "dynamic_tree 0.75x" in ax.get_title()                       # best vs best: 300 / 400
    assert ax.get_xlabel().startswith("batch size") and "tokens/s" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["target_greedy", "dynamic_tree"]
    # both PNGs are written, same size, and differ by the outlines and labels
    with_best, without = tmp_path / "best.png", tmp_path / "plain.png"
    bench_chart(runs, best, speedup_best_vs_best(best), with_best)
    bench_chart(runs, [], {}, without)
    with Image.open(with_best) as a, Image.open(without) as b:
        assert a.size == b.size and a.tobytes() != b.tobytes()


def test_line_chart_and_bar_chart_read_back(tmp_path):
    from jobs.charts import bar_chart, line_chart
    panels = [("loss", {"train": [(10, 3.0), (20, 0.5), (30, 0.0)], "eval": [(10, 2.0), (30, 0.4)]}, True,
               None, "loss (nats/token)"),
              ("accuracy", {"acc": [(100, 0.7), (200, 0.9)]}, False, (0.0, 1.0)),
              ("nothing yet", {"kl": []}, True)]
    line_chart(panels, tmp_path / "curves.png")
    bar_chart({}, tmp_path / "sub" / "empty.png", title="no ok rows")        # no data: still a PNG
    for name, size in (("curves.png", (3 * 460, 360)), ("sub/empty.png", (520, 320))):
        with Image.open(tmp_path / name) as image:
            image.load()
            assert image.format == "PNG" and image.size == size


def test_batch_sizes_and_images_defaults():
    assert parse_batch_sizes("1,8,32,128") == [1, 8, 32, 128]
    assert parse_batch_sizes("8, 1,8") == [1, 8]
    assert resolve_images(None, [1, 8, 32, 128]) == 128          # enough for the largest batch
    assert resolve_images(None, [1, 2], quick=True) == 4
    assert resolve_images(200, [1, 128]) == 200
    with pytest.raises(UserError, match="--images 16 is smaller than the largest --batch-sizes 128"):
        resolve_images(16, [1, 8, 32, 128])
    for bad in ("1,x", "0,8", ""):
        with pytest.raises(UserError, match="--batch-sizes"):
            parse_batch_sizes(bad)


def test_bench_default_batch_sizes_are_1_8_32_128():
    from jobs.cli import build_parser
    args = build_parser().parse_args(["bench"])
    assert args.batch_sizes is None and args.images is None       # resolved in run(): 1,8,32,128 on 128 images
    from jobs.bench import DEFAULT_BATCH_SIZES
    assert parse_batch_sizes(DEFAULT_BATCH_SIZES) == [1, 8, 32, 128]


def test_bench_too_few_images_exit_2_before_loading(capsys):
    assert main(["bench", "--images", "16", "--target", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "--images 16 is smaller than the largest --batch-sizes 128" in err


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
    tau = calibrate_tau(decoder, ids, mask, pixels, 24, (1, 4, 16, 10 ** 6), (1, 3, 6))
    assert decoder.tree == TreeConfig(threshold=0.0) and decoder.step_observer is None   # restored
    for d in (1, 3, 6):
        assert 1.0 <= tau[(1, d)] <= tau[(4, d)] <= tau[(16, d)] <= tau[(10 ** 6, d)] <= d + 1
    # With room for every candidate, deeper trees never accept less. With a small budget they may:
    # deeper chain nodes rank first and push accepted shallow siblings out (the estimate says so).
    assert tau[(10 ** 6, 1)] <= tau[(10 ** 6, 3)] <= tau[(10 ** 6, 6)]


def test_choose_table_measures_each_batch_size():
    target, draft = _pair()
    ids, mask, pixels = random_batch(target, 2, [4, 7], seed=1)
    decoder = SpeculativeDecoder(target, draft)
    table = choose_table(decoder, ids, mask, pixels, batch_sizes=(1, 4), max_new_tokens=12,
                         shapes=((1, 1), (4, 2)), steps=1)
    assert [e.batch_size for e in table.entries] == [1, 4]
    for e in table.entries:
        assert set(e.step_s) == {"1,1", "4,2", "none"} and all(v > 0 for v in e.step_s.values())
        tps, sp = e.predicted_tps, e.spread
        assert set(sp) == set(tps) and e.noise == max(sp.values())
        chosen = "none" if e.tree is None else f"{e.tree.max_nodes},{e.tree.max_depth}"
        best_tree = max((k for k in tps if k != "none"), key=tps.get)
        no_drafting_wins = tps["none"] > tps[best_tree] * (1 + sp["none"] + sp[best_tree])
        assert (e.tree is None) == no_drafting_wins
        if e.tree is not None:   # the best tree, whether or not "none" was (within noise) faster
            assert chosen == best_tree
        assert e.predicted_tps["none"] == pytest.approx(1 / e.step_s["none"])
        assert e.noise >= 0
    assert decoder.budget is None and json.dumps(table.to_dict())


def test_bench_says_no_drafting_instead_of_a_speedup():
    from jobs.bench import log_speedups

    runs = [dict(row("target_greedy", 8, 100.0), drafting=False), dict(row("dynamic_tree", 8, 104.0), drafting=False),
            dict(row("target_greedy", 1, 10.0), drafting=False), dict(row("dynamic_tree", 1, 30.0), drafting=True)]
    lines = []
    log_speedups(runs, lines.append)
    assert "batch   8  dynamic_tree   no drafting (the budget chose plain target steps here)" in lines
    assert "batch   1  dynamic_tree   3.00x target greedy" in lines and not any("1.04x" in x for x in lines)
    best = best_per_method(runs)
    text = "\n".join(best_lines(best, speedup_best_vs_best(best), runs=runs))
    assert "dynamic_tree" in text and "no drafting there" in text and "1.04x" not in text


def test_no_drafting_must_win_beyond_the_noise():
    from decoding.budget import choose, relative_spread

    assert relative_spread([1.0, 1.2, 1.1]) == pytest.approx(0.1 / 1.1)
    assert relative_spread([2.0]) == 0.0
    assert choose({None: 10.0, (1, 1): 9.5, (4, 2): 9.0}, noise=0.1) == (1, 1)   # within noise: keep drafting
    assert choose({None: 10.0, (1, 1): 9.5}, noise=0.01) is None                 # clearly faster: stop
    assert choose({None: 5.0, (1, 1): 9.0, (4, 2): 12.0}, noise=0.5) == (4, 2)
    assert choose({None: 5.0}, noise=0.0) is None
    # per-shape noise: no drafting must beat the best tree beyond both shapes' spreads together
    assert choose({None: 10.0, (1, 1): 9.0}, {None: 0.01, (1, 1): 0.2}) == (1, 1)
    assert choose({None: 10.0, (1, 1): 9.0}, {None: 0.01, (1, 1): 0.05}) is None
    # trees compete on predicted tokens/s alone (a bigger tree within noise is not preferred)
    assert choose({None: 5.0, (1, 1): 10.0, (8, 4): 9.9}, {None: 0.0, (1, 1): 0.3, (8, 4): 0.3}) == (1, 1)


def test_budget_table_lookup_by_active_rows():
    chain, bushy = TreeConfig(max_nodes=1, max_depth=1), TreeConfig()
    table = BudgetTable(entries=[BudgetEntry(1, bushy), BudgetEntry(8, chain), BudgetEntry(32, None)])
    assert [table.lookup(b) for b in (1, 2, 7)] == [bushy] * 3
    assert [table.lookup(b) for b in (8, 31)] == [chain] * 2
    assert table.lookup(32) is None and table.lookup(500) is None
    assert BudgetTable(entries=[BudgetEntry(8, chain)]).lookup(1) == chain   # below every entry: the smallest


def test_budget_lookup_between_calibrated_sizes_interpolates_the_neighbours_step_times():
    """Between two calibrated batch sizes the table picks one of the two neighbours' choices by
    their step times interpolated to the active rows (figures shaped like the real-weights pair's:
    the 1-row tree costs 3x the 8-row one at 8 rows), never another shape; a hand-made table
    without step times keeps the lower neighbour's choice."""
    big, small = TreeConfig(max_nodes=24, max_depth=6), TreeConfig(max_nodes=4, max_depth=3)
    tau = {(24, 6): 5.0, (4, 3): 3.0}
    table = BudgetTable(entries=[
        BudgetEntry(1, big, step_s={"24,6": 0.105, "4,3": 0.068, "none": 0.040}),
        BudgetEntry(8, small, step_s={"24,6": 0.344, "4,3": 0.125, "none": 0.072}),
        BudgetEntry(32, None, step_s={"24,6": 1.2, "4,3": 0.40, "none": 0.12}, spread={"4,3": 0.01, "none": 0.01}),
    ], tau=tau)
    # 24/6 at r rows: 105 + 34.1 (r - 1) ms for 5 tokens; 4/3: 68 + 8.1 (r - 1) ms for 3 tokens
    assert table.lookup(1) == big and table.lookup(8) == small
    assert [table.lookup(r) for r in range(2, 8)] == [small] * 6
    # between 8 (4/3) and 32 (none): 4/3 at r rows 125 + 11.5 (r - 8) ms for 3 tokens beats none's
    # 72 + 2 (r - 8) ms for 1 token up to r = 24, beyond both spreads
    assert [table.lookup(r) for r in (9, 20, 24)] == [small] * 3
    assert [table.lookup(r) for r in (26, 31)] == [None] * 2
    assert table.lookup(32) is None and table.lookup(100) is None
    # at 2 rows a bushier tree that stays cheap wins over the 8-row choice
    cheap = BudgetTable(entries=[BudgetEntry(1, big, step_s={"24,6": 0.050, "4,3": 0.045}),
                                 BudgetEntry(8, small, step_s={"24,6": 0.200, "4,3": 0.100})], tau=tau)
    assert cheap.lookup(2) == big and cheap.lookup(7) == small
    chain = TreeConfig(max_nodes=1, max_depth=1)
    assert BudgetTable(entries=[BudgetEntry(1, big), BudgetEntry(8, chain)]).lookup(7) == big   # no figures


def test_drift_monitor_flags_step_times_and_acceptance_that_left_the_calibration():
    from decoding.budget import DriftMonitor

    chain = TreeConfig(max_nodes=4, max_depth=3)
    table = BudgetTable(entries=[BudgetEntry(1, chain, step_s={"4,3": 0.010, "none": 0.008}),
                                 BudgetEntry(8, None, step_s={"4,3": 0.030, "none": 0.020})],
                        tau={(4, 3): 3.0})
    monitor = DriftMonitor(table, window=4, tolerance=0.3, max_remeasures=2)
    # steps like the calibration: no drift; steps at an uncalibrated batch size are not compared
    assert all(monitor.observe(1, 0.011, [3, 3]) is None for _ in range(8))
    assert all(monitor.observe(5, 1.0, [1]) is None for _ in range(8))
    assert all(monitor.observe(8, 0.021, [1] * 8) is None for _ in range(8))   # "none": acceptance 1 is expected
    # a window of steps twice as slow at batch 1 -> re-measure, said with the figures
    reasons = [monitor.observe(1, 0.020, [3]) for _ in range(4)]
    assert reasons[:3] == [None] * 3 and reasons[3].startswith("at batch 1 (4 nodes/depth 3) steps take 20.0 ms, "
                                                               "calibrated 10.0 ms over 4 steps")
    assert monitor.window == 8 and monitor.remeasures_left == 1
    monitor.reset(table)
    # faster than calibrated counts too ("no drafting" measured while the machine was busy)
    reasons = [monitor.observe(8, 0.010, [1]) for _ in range(8)]
    assert reasons[-1] is not None and "steps take 10.0 ms, calibrated 20.0 ms" in reasons[-1]
    assert "no drafting" in reasons[-1] and monitor.remeasures_left == 0
    # the cap: no more re-measures, whatever the steps do (acceptance far off here)
    monitor.reset(table)
    assert all(monitor.observe(1, 0.010, [1]) is None for _ in range(40))
    # acceptance alone
    fresh = DriftMonitor(table, window=4)
    reasons = [fresh.observe(1, 0.010, [1, 2]) for _ in range(4)]
    assert "1.50 tokens accepted per step, calibrated 3.00" in reasons[-1] and "steps take" not in reasons[-1]
    # a calibration too noisy to trust is measured again after one window, even if steps agree
    noisy = BudgetTable(entries=[BudgetEntry(1, chain, step_s={"4,3": 0.010, "none": 0.008}, noise=0.8)],
                        tau={(4, 3): 3.0})
    monitor = DriftMonitor(noisy, window=2)
    reasons = [monitor.observe(1, 0.010, [3]) for _ in range(2)]
    assert reasons == [None, "at batch 1 (4 nodes/depth 3) its calibration's step times varied by ±80% over 2 steps"]
    with pytest.raises(ValueError, match="window"):
        DriftMonitor(table, window=0)


def test_tau_counts_a_rows_last_step_only_up_to_its_eos():
    """A step whose path runs past the row's EOS yields only the tokens up to it (cap)."""
    # a chain of 4 accepted nodes (ranks 0..3, depths 1..4); EOS is the step's 2nd token
    step = ([0, 1, 2, 3], [1, 2, 3, 4], [0, 1, 2, 3], [1, 2, 3, 4])
    uncapped = tau_from_steps([step], (8,), (4,))
    capped = tau_from_steps([step + (2,)], (8,), (4,))
    assert uncapped[(8, 4)] == 5 and capped[(8, 4)] == 2
    assert tau_from_steps([step + (None,)], (8,), (1,))[(8, 1)] == 2 == tau_from_steps([step + (2,)], (8,), (1,))[(8, 1)]


def test_tau_ranks_nodes_among_shallow_candidates_only():
    """A path node is kept with budget n at depth bound d iff fewer than n candidates of depth
    <= d rank before it: deeper candidates do not count against it when d excludes them."""
    # candidates: A (depth 1, rank 0), X (depth 3, rank 1), Y (depth 3, rank 2), B (depth 2, rank 3)
    # accepted path: A then B
    step = ([0, 3], [1, 2], [0, 1, 2, 3], [1, 3, 3, 2])
    tau = tau_from_steps([step], (2, 4), (2, 3))
    assert tau[(2, 2)] == 3.0     # at d=2, X and Y do not exist: B is 2nd -> kept (the old estimate said 2.0)
    assert tau[(2, 3)] == 2.0     # at d=3, A, X, Y rank before B: not kept with n=2
    assert tau[(4, 3)] == 3.0


def test_forward_latency_positive():
    target, _ = _pair()
    lat = forward_latency(target, sizes=(1, 4), prefix_len=8, repeats=1)
    assert set(lat) == {1, 4} and all(v > 0 for v in lat.values())


def test_bench_compiled_engine_and_hf_static(capsys):
    """--compile on runs our engine's step graphs (plain_engine: the verify graph alone; the drafting
    graphs are tested in tests/decoding/test_graphs.py); hf_static is HF generate with a static cache
    and a compiled forward. Both reproduce target greedy exactly (fp32); the warm-up (the compiles)
    is timed."""
    assert main(["bench", "--quick", "--json", "--chart", "", "--batch-sizes", "1", "--images", "1",
                 "--methods", "target_greedy,hf_static,plain_engine", "--compile", "on",
                 "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["compile"] == "on"
    for r in report["runs"]:
        assert r["match_rate"] == 1.0, r["method"]
    warm = {r["method"]: r["warmup_s"] for r in report["runs"]}
    assert warm["plain_engine"] > 10 * warm["target_greedy"]     # the compile happened in the warm-up
    assert warm["hf_static"] > 10 * warm["target_greedy"]
    assert report["vs_best_plain"] == []                    # no speculative method ran
    assert "best plain_engine" in captured.err and "no drafting there" not in captured.err


def test_every_bench_method_has_its_own_colour_in_the_chart():
    from jobs.bench import METHODS
    from jobs.charts import _method_color

    methods = list(METHODS) + ["some_new_method"]
    colours = [_method_color(m, methods) for m in methods]
    assert len(set(colours)) == len(colours), dict(zip(methods, colours))


def test_bench_calibrates_acceptance_over_the_runs_own_length(capsys, monkeypatch):
    """The budget's acceptance decode runs as many tokens as the bench's rows (up to the cap):
    acceptance changes along a row, so a short calibration of long rows over-rates big trees."""
    import decoding.budget as budget
    from decoding.budget import MAX_CALIBRATION_TOKENS, calibration_tokens

    assert calibration_tokens(10) == 10 and calibration_tokens(10 ** 4) == MAX_CALIBRATION_TOKENS
    seen = []
    real = budget.calibrate_tau

    def recording(decoder, ids, mask, pixels, max_new_tokens, *args, **kwargs):
        seen.append(max_new_tokens)
        return real(decoder, ids, mask, pixels, max_new_tokens, *args, **kwargs)

    monkeypatch.setattr(budget, "calibrate_tau", recording)
    for cap, expected in ((10 ** 3, 11), (5, 5)):   # --quick rows are 12 tokens at most: a cap below
        monkeypatch.setattr(budget, "MAX_CALIBRATION_TOKENS", cap)
        seen.clear()
        assert main(["bench", "--quick", "--json", "--chart", "", "--ignore-eos", "--max-new-tokens", "11",
                     "--batch-sizes", "1", "--images", "1", "--methods", "target_greedy,dynamic_tree"]) == 0
        json.loads(capsys.readouterr().out)
        assert seen == [expected], (cap, seen)
