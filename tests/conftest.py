import os

# torch's OpenMP threads spin while waiting; on a loaded 2-core machine that makes small SVDs
# hundreds of times slower. Passive waiting costs nothing when the machine is quiet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny models: threads cost more than they save on a loaded CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
