"""Min-of-60 latency of one 4-token forward over an 80-token cache: transformers vs decoding/lean.py.

    python scripts/lean_latency.py     # prints ms for a draft-sized and a demo-target-sized model + max logit diff
"""
import sys, torch, time; sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parent.parent)); torch.set_num_threads(1)
from decoding.testing import make_tiny_llava
from decoding.models import prefill, forward_block
for h, L in [(128, 2), (384, 9)]:
    m = make_tiny_llava(seed=0, image_token_id=95, hidden_size=h, num_layers=L, num_heads=4)
    ids = torch.randint(3, 90, (1, 80))
    state, _ = prefill(m, ids, torch.ones_like(ids), None)
    q = 4
    tok = torch.randint(3, 90, (1, q)); pos = state.lengths[:, None] + torch.arange(q)
    vis = torch.tril(torch.ones(q, q, dtype=torch.bool))[None]; val = torch.ones(1, q, dtype=torch.bool)
    res = {}
    with torch.no_grad():
        for lean in (False, True) * 2:
            ts = []
            for _ in range(60):
                t0 = time.perf_counter(); lg = forward_block(m, state, tok, pos, vis, val, lean=lean); ts.append(time.perf_counter() - t0); state.crop()
            res[lean] = (min(ts) * 1e3, lg)
    print(h, L, "hf %.2f ms  lean %.2f ms" % (res[False][0], res[True][0]), "maxdiff", (res[False][1] - res[True][1]).abs().max().item())
