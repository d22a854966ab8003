"""Per-phase time of the decoder vs HF greedy on the demo pair, batch 1, 8 images, a few tree shapes.

    python scripts/decode_breakdown.py
"""
import sys, torch, time; sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parent.parent)); torch.set_num_threads(1)
from transformers import AutoProcessor
from decoding import SpeculativeDecoder, TreeConfig
from decoding.loading import load_llava
from jobs.bench import make_inputs, encode
t = load_llava('assets/demo-pair/target'); d = load_llava('assets/demo-pair/draft')
p = AutoProcessor.from_pretrained('assets/demo-pair/target')
text, imgs = make_inputs(p, 8)
for cfg in [TreeConfig(max_nodes=4, max_depth=4), TreeConfig(max_nodes=8, max_depth=6), TreeConfig(top_k=2, frontier=2, max_nodes=6, max_depth=8, threshold=0.1)]:
    dec = SpeculativeDecoder(t, d, cfg)
    tot = {"pre":0,"dr":0,"ver":0,"wall":0, "tok":0, "steps":0}
    for im in imgs:
        ids, m, px = encode(p, text, [im], 'cpu', torch.float32)
        t0=time.perf_counter(); r = dec.generate(ids, m, px, max_new_tokens=48); w=time.perf_counter()-t0
        s=r.stats[0]; tot["pre"]+=s.prefill_s; tot["dr"]+=s.draft_s; tot["ver"]+=s.verify_s; tot["wall"]+=w; tot["tok"]+=s.new_tokens; tot["steps"]+=len(s.accepted_lengths)
    t0=time.perf_counter()
    for im in imgs:
        ids, m, px = encode(p, text, [im], 'cpu', torch.float32)
        with torch.no_grad(): t.generate(input_ids=ids, attention_mask=m, pixel_values=px, max_new_tokens=48, do_sample=False)
    g=time.perf_counter()-t0
    print(cfg.max_nodes, cfg.max_depth, {k: round(v,3) for k,v in tot.items()}, "hf greedy wall", round(g,3))
