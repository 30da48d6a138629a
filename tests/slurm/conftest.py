"""Fixtures for the tests that run the slurm/ scripts on a real Slurm (see .ci/slurm_up.sh).

In CI (CI=true) a missing cluster is a failure; elsewhere these tests are skipped with the reason.
"""

from __future__ import annotations

import pytest

from slurm_helpers import cluster_problem, in_ci


@pytest.fixture(scope="session")
def slurm_cluster():
    problem = cluster_problem()
    if problem:
        if in_ci():
            pytest.fail(f"CI=true but Slurm is not up: {problem}", pytrace=False)
        pytest.skip(f"no local Slurm cluster: {problem}")
    return True
