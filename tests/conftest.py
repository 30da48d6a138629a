"""Session-scoped fixtures: real megatron-core torch_dist checkpoints (see ckpt_factory.py).

Each fixture returns the list of checkpoint directories ``[iter_0000010, iter_0000020,
iter_0000030]`` (oldest first) of one Megatron-LM-style save dir (tracker included, in the
parent directory). The files are read-only: copy them (``ckpt_factory.copy_run``) before
modifying anything. Built lazily, once per session (or once per ``$PMA_TEST_CACHE``).

=================  ==================================================================
fixture            run
=================  ==================================================================
gpt_tp2            TP=2, DP=1, fp32, no optimizer state
gpt_tp2_pp2        TP=2, PP=2 (4 ranks), fp32, no optimizer state
gpt_tp1_optim      TP=1, fp32, non-distributed optimizer (model-shaped fp32_param,
                   exp_avg, exp_avg_sq)
gpt_tp2_distopt    TP=1, DP=2 (2 ranks), fp32, distributed optimizer, dp_reshardable
                   buckets (3 buckets) -- DP=2 makes the bucket sharding visible
gpt_bf16           TP=1, bf16 params, non-distributed optimizer (fp32 master params)
gpt_mcore014       as gpt_tp2, saved by megatron-core 0.14.0 (pip-installed at test
                   time into the cache; skipped when pip cannot fetch it)
gpt_mcore0192      as gpt_tp2, saved by megatron-core 0.19.2 (idem)
legacy_bf16        legacy --ckpt-format torch, TP=2, bf16, Float16 optimizer, 2 layers,
                   saved by 0.19.2's Megatron-LM save_checkpoint (see legacy_factory.py)
legacy_distopt     as legacy_bf16, distributed optimizer (distrib_optim.pt)
=================  ==================================================================

All: GPTModel, 4 layers, hidden 64, 4 heads, FFN 256, vocab 256, seq 32, seed 0.
"""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import settings

# Property tests are derandomized everywhere (CI and the README's command): the same examples
# every run, no example database replaying an old failure. A flake would cost a whole CI run.
settings.register_profile("deterministic", derandomize=True, database=None, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# `merge --workers` defaults to one process per core: tests say when they want more (and the CLI
# called inside pytest must never fork it). test_merge_real covers the default itself.
os.environ.setdefault("MEGATRON_PMA_WORKERS", "1")

import ckpt_factory  # noqa: E402

FIXTURE_RUNS = {
    "gpt_tp2": dict(tp=2),
    "gpt_tp2_pp2": dict(tp=2, pp=2),
    "gpt_tp1_optim": dict(tp=1, optimizer="model"),
    "gpt_tp2_distopt": dict(tp=1, nproc=2, optimizer="dist"),
    "gpt_bf16": dict(tp=1, dtype="bf16", optimizer="model"),
}


@pytest.fixture(scope="session")
def ckpt_cache_root(tmp_path_factory):
    if not os.environ.get("PMA_TEST_CACHE"):
        ckpt_factory.set_session_cache_root(tmp_path_factory.mktemp("ckpt-cache"))
    return ckpt_factory.cache_root()


@pytest.fixture(scope="session")
def gpt_tp2(ckpt_cache_root):
    return ckpt_factory.cached_run("gpt_tp2", **FIXTURE_RUNS["gpt_tp2"])


@pytest.fixture(scope="session")
def gpt_tp2_pp2(ckpt_cache_root):
    return ckpt_factory.cached_run("gpt_tp2_pp2", **FIXTURE_RUNS["gpt_tp2_pp2"])


@pytest.fixture(scope="session")
def gpt_tp1_optim(ckpt_cache_root):
    return ckpt_factory.cached_run("gpt_tp1_optim", **FIXTURE_RUNS["gpt_tp1_optim"])


@pytest.fixture(scope="session")
def gpt_tp2_distopt(ckpt_cache_root):
    return ckpt_factory.cached_run("gpt_tp2_distopt", **FIXTURE_RUNS["gpt_tp2_distopt"])


@pytest.fixture(scope="session")
def gpt_bf16(ckpt_cache_root):
    return ckpt_factory.cached_run("gpt_bf16", **FIXTURE_RUNS["gpt_bf16"])


# ------------------------------------------------ other megatron-core versions (need pip)
MCORE_OLD = "0.14.0"  # .metadata pickles megatron classes (MCoreSavePlan in all_local_plans)
MCORE_NEW = "0.19.2"  # common state inside DCP (common_state/shard_0_1), no common.pt


def _megatron_core(version):
    try:
        return ckpt_factory.install_megatron_core(version)
    except ckpt_factory.FixtureBuildError as e:
        pytest.skip(f"megatron-core=={version} not installable here: {str(e)[:300]}")


@pytest.fixture(scope="session")
def mcore_old_path(ckpt_cache_root):
    return _megatron_core(MCORE_OLD)


@pytest.fixture(scope="session")
def mcore_new_path(ckpt_cache_root):
    return _megatron_core(MCORE_NEW)


@pytest.fixture(scope="session")
def gpt_mcore014(mcore_old_path):
    """gpt_tp2's run, saved by megatron-core 0.14.0 (same weights bit for bit)."""
    return ckpt_factory.cached_run(
        "gpt_mcore014", **FIXTURE_RUNS["gpt_tp2"], megatron_path=str(mcore_old_path)
    )


@pytest.fixture(scope="session")
def gpt_mcore0192(mcore_new_path):
    """gpt_tp2's run, saved by megatron-core 0.19.2 (same weights bit for bit)."""
    return ckpt_factory.cached_run(
        "gpt_mcore0192", **FIXTURE_RUNS["gpt_tp2"], megatron_path=str(mcore_new_path)
    )


# ------------------------------------------- legacy --ckpt-format torch (real Megatron-LM save)
@pytest.fixture(scope="session")
def legacy_bf16(mcore_new_path):
    """TP=2 legacy run (mp_rank_00/01/model_optim_rng.pt), bf16 + Float16 optimizer (fp32 main
    params in ``optimizer/fp32_from_fp16_params``), saved by 0.19.2's Megatron-LM save_checkpoint."""
    import legacy_factory

    return legacy_factory.cached_legacy_run("legacy_bf16", mcore_new_path, optimizer="adam")


@pytest.fixture(scope="session")
def legacy_distopt(mcore_new_path):
    """As legacy_bf16 with the distributed optimizer: ``distrib_optim.pt`` beside each rank file."""
    import legacy_factory

    return legacy_factory.cached_legacy_run("legacy_distopt", mcore_new_path, optimizer="dist")


def pytest_terminal_summary(terminalreporter):
    if ckpt_factory.BUILD_TIMES:
        terminalreporter.write_sep("-", "checkpoint fixture build times")
        for name, secs in ckpt_factory.BUILD_TIMES.items():
            cpu = ckpt_factory.BUILD_CPU.get(name, float("nan"))
            terminalreporter.write_line(f"{name}: {secs:.1f} s wall, {cpu:.1f} s CPU")


@pytest.fixture(scope="session")
def bridge(ckpt_cache_root):
    """Megatron-Bridge 0.6.2's real modules (see bridge_factory.py); skipped when pip cannot fetch them."""
    import bridge_factory

    try:
        return bridge_factory.bridge()
    except bridge_factory.WheelUnavailable as e:
        pytest.skip(str(e))
