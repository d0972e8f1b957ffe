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


@pytest.fixture(autouse=True)
def no_store_writer_outlives_its_test():
    """A store's writer thread left running after a test would write (and warn) into the next ones."""
    import threading

    from geometry.capture.writer import THREAD_NAME

    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive() and t not in before]
    if left:
        pytest.fail(f"{len(left)} geometry store writer thread(s) outlived the test: close the Store or Recorder")
