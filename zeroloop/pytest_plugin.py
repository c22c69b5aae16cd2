"""pytest fixtures from :mod:`zeroloop.testing`, registered through the ``pytest11`` entry
point. They do nothing unless a test asks for them by name.

- ``zeroloop_single_process``: the test runs as a one-rank DeepSpeed job.
- ``zeroloop_fp16_on_cpu``: DeepSpeed's fp16 paths run on the CPU for the test.
- ``zeroloop_tiny_config``: the :func:`zeroloop.testing.tiny_config` factory.
"""

import pytest


@pytest.fixture
def zeroloop_single_process():
    from zeroloop.testing import single_process

    with single_process():
        yield


@pytest.fixture
def zeroloop_fp16_on_cpu():
    from zeroloop.testing import fp16_on_cpu

    with fp16_on_cpu():
        yield


@pytest.fixture
def zeroloop_tiny_config():
    from zeroloop.testing import tiny_config

    return tiny_config
