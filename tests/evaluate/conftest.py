"""Fixtures of the evaluation tests (helpers live in `eval_helpers`)."""

import pytest
from eval_helpers import Models, build_models


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Models:
    return build_models(tmp_path_factory.mktemp("evaluate-models"))
