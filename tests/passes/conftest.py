import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


@pytest.fixture(autouse=True)
def _inference():
    # Compressed programs are run for inference; running in-place cache writes with grad
    # enabled makes the buffers part of an autograd graph, which torch.export.save rejects.
    with torch.no_grad():
        yield
