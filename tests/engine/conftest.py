"""Real megatron-core checkpoint runs for the engine tests (built once per cache, see ckpt_factory)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ckpt_factory  # noqa: E402


@pytest.fixture(scope="session")
def run_tp2():
    return ckpt_factory.cached_run("tp2", tp=2, iterations=(10, 20, 30))


@pytest.fixture(scope="session")
def run_tp1_optim():
    return ckpt_factory.cached_run("tp1_optim", tp=1, iterations=(10, 20, 30), optimizer="model")


@pytest.fixture(scope="session")
def run_pp2_bf16():
    return ckpt_factory.cached_run("pp2_bf16", tp=1, pp=2, iterations=(10, 20, 30), dtype="bf16")


@pytest.fixture(scope="session")
def run_dp2_distopt():
    return ckpt_factory.cached_run("dp2_distopt", tp=1, nproc=2, iterations=(10, 20, 30), optimizer="dist")
