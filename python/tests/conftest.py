import os

import pytest
import torch


def pytest_report_header(config):
    import distillation
    return f"distillation {distillation.version()}, torch {torch.__version__}"


def cuda_or_skip():
    """CUDA tests run on a GPU machine; elsewhere they skip, unless DISTILLATION_REQUIRE names
    cuda (then a missing GPU fails)."""
    if torch.cuda.is_available():
        return
    required = "cuda" in os.environ.get("DISTILLATION_REQUIRE", "").split(",")
    if required:
        pytest.fail("DISTILLATION_REQUIRE includes cuda but torch.cuda.is_available() is False")
    pytest.skip("no CUDA device here: the CUDA tensor tests run on a GPU machine")
