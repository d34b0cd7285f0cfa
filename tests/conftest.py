"""Test configuration: deterministic hypothesis examples in CI and under the Makefile (HYPOTHESIS_PROFILE=ci), fresh
random ones when pytest runs alone."""

import os
import sys

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))  # tests/naive.py

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


TEST_THREADS = int(os.environ.get("FREEATTEN_TEST_THREADS", "1"))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread per test process (pytest -n 2 on 2 cores, no spin-waiting under contention), or
    ``FREEATTEN_TEST_THREADS`` of them (``make test-portability`` runs 1 and 2)."""
    n = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(n)
