"""Session fixture: a real local SLURM cluster (slurmctld + 2 slurmd) for the template tests."""

from __future__ import annotations

import pytest
from slurm_cluster import LocalSlurm, missing_binaries


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """Started once per session, stopped by pid at the end (also when a test failed)."""
    missing = missing_binaries()
    if missing:
        pytest.skip(
            f"SLURM is not installed ({', '.join(missing)} missing): "
            "apt-get install slurmctld slurmd slurm-client, or scripts/setup.sh --test"
        )
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
