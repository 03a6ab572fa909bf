"""Fixtures of the trainer's tests: small worlds and batches, built once per session."""

import pytest

from tests.training import helpers


@pytest.fixture(scope="session")
def worlds_dir(tmp_path_factory):
    """The small config's embedded worlds as ArrayRecord shards."""
    return helpers.write_small_worlds(str(tmp_path_factory.mktemp("worlds")))


@pytest.fixture
def config(worlds_dir):
    """A fresh small config on one device, reading `worlds_dir`."""
    return helpers.small_config(worlds_dir, **{"mesh.data": 1})


@pytest.fixture(scope="session")
def batches(worlds_dir):
    """The first four host batches of the small config's training stream."""
    return helpers.host_batches(helpers.small_config(worlds_dir), 4)
