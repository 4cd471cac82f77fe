"""Fixtures for the Hugging Face interop tests (helpers live in `hf_reference`)."""

import pytest
from hf_reference import SHAPES


@pytest.fixture(params=list(SHAPES))
def shape(request) -> str:
    return request.param
