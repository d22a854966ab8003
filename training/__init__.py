"""training: synthetic data, the demo pair's training and draft distillation (torch only, no Ray).

Imports only `decoding` and itself; `jobs/` (the CLI) calls it. See README's architecture map.
"""
