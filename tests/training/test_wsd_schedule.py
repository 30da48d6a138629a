"""The WSD learning-rate schedule of the tiny pretraining (pure function)."""

import pytest

from megatron_pma.training.tiny_gpt import batch_offsets, wsd_lr


def test_wsd_phases():
    kw = dict(lr=1.0, train_iters=100, warmup_iters=10, decay_iters=20, min_lr=0.1)
    assert wsd_lr(0, **kw) == pytest.approx(0.1)
    assert wsd_lr(9, **kw) == pytest.approx(1.0)
    assert all(wsd_lr(i, **kw) == 1.0 for i in range(10, 80))
    decay = [wsd_lr(i, **kw) for i in range(80, 100)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert decay[-1] == pytest.approx(0.1)
    assert wsd_lr(85, **kw) == pytest.approx(0.1 + 0.9 * (1 - 6 / 20))


@pytest.mark.parametrize("style", ["linear", "cosine", "exponential", "minus_sqrt"])
def test_wsd_decay_styles_end_at_min(style):
    kw = dict(lr=2.0, train_iters=50, warmup_iters=0, decay_iters=10, min_lr=0.0, decay_style=style)
    assert wsd_lr(39, **kw) == 2.0
    assert 0 < wsd_lr(40, **kw) < 2.0
    assert wsd_lr(49, **kw) == pytest.approx(0.0, abs=1e-12)


def test_constant_without_decay():
    assert {wsd_lr(i, lr=3e-3, train_iters=100, warmup_iters=0) for i in range(100)} == {3e-3}


def test_anneal_branch_is_a_restart():
    """The demo's anneal branch restarts at 85% with decay over the last 15%: up to the branch point
    it is the constant-LR run."""
    const = [wsd_lr(i, lr=1e-2, train_iters=1000, warmup_iters=20) for i in range(1000)]
    ann = [wsd_lr(i, lr=1e-2, train_iters=1000, warmup_iters=20, decay_iters=150) for i in range(1000)]
    assert const[:850] == ann[:850] and ann[-1] == 0.0


def test_batches_are_a_function_of_iteration():
    a = batch_offsets(7, 16, 64, 10_000, seed=3)
    assert a.equal(batch_offsets(7, 16, 64, 10_000, seed=3))
    assert not a.equal(batch_offsets(8, 16, 64, 10_000, seed=3))
