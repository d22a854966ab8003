"""training.schedule.warmup_cosine: the one learning-rate schedule of the training code."""
import math

import pytest

from training.schedule import warmup_cosine


def test_warmup_is_linear_then_cosine_to_the_floor():
    lr = [warmup_cosine(s, peak=1.0, total=100, warmup=10, floor=0.1) for s in range(100)]
    assert lr[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr[10] == pytest.approx(1.0)                      # decay starts once warmup is over
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))     # then never rises
    assert warmup_cosine(100, peak=1.0, total=100, warmup=10, floor=0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, peak=2.0, total=100, warmup=10, floor=0.1) == pytest.approx(0.2)


def test_decay_from_the_start_overlaps_the_warmup():
    """The vision stage's curve: warmup factor times a cosine over the whole run."""
    for step in (0, 5, 49, 50, 700, 1499):
        want = 1e-3 * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / 1500)))
        got = warmup_cosine(step, peak=1e-3, total=1500, warmup=50, floor=0.05, decay_start=0)
        assert got == pytest.approx(want, rel=1e-12)
