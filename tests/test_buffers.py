"""geometry.buffers: one buffer reused in turn, and a thread's spare kept within ``reusing`` only."""

import threading

import numpy as np
import torch

from geometry.buffers import Scratch, reusing, spare
from geometry.kernels import gram, long_product, mm
from geometry.subspaces import principal_angles


def test_scratch_serves_any_dtype_from_one_buffer_and_grows_to_the_largest():
    s = Scratch()
    a = s.take((4, 8))  # float64, 256 bytes
    assert a.dtype == torch.float64 and a.shape == (4, 8) and a.is_contiguous()
    b = s.take((16,), torch.float32)  # 64 bytes: the same memory
    assert b.data_ptr() == a.data_ptr() and s.capacity == 256
    c = s.take((100,))  # 800 bytes: a new buffer, and it stays that size
    assert s.capacity == 800 and s.take((3,), torch.uint8).data_ptr() == c.data_ptr()
    w = s.widen(torch.arange(6, dtype=torch.float32).view(2, 3).mT)  # a transposed view widened in stored order
    assert w.dtype == torch.float64 and torch.equal(w, torch.arange(6.0).view(2, 3).mT)


def test_mm_into_a_buffer_is_the_product():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 7, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64)
    s = Scratch()
    out = mm(a, b, s)
    assert torch.equal(out, mm(a, b)) and out.data_ptr() == s.take((1,)).data_ptr()
    assert torch.equal(mm(a.float(), b, s), mm(a.float(), b))  # mixed dtypes: numpy's promotion, a new array


def test_spare_keeps_nothing_outside_reusing():
    with spare() as first:
        first.take((1000,))
    with spare() as second:
        assert second is not first and second.capacity == 0


def test_within_reusing_the_largest_spare_is_kept_and_lent_next():
    with reusing():
        with spare() as big, spare() as small:  # nested: two different buffers
            assert big is not small
            big.take((1000,))
            small.take((10,))
        with spare() as again, spare() as fresh:
            assert again is big and fresh is not small and fresh.capacity == 0
    with spare() as after:  # left: let go
        assert after is not big


def test_each_thread_keeps_its_own_spare():
    seen = {}

    def work(name):
        with reusing():
            with spare() as s:
                s.take((10,))
            with spare() as s2:
                seen[name] = (s, s2)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(s is s2 for s, s2 in seen.values()) and seen[0][0] is not seen[1][0]


def test_results_formed_in_spares_are_the_same_within_reusing_and_outside():
    """The Gram matrix, the long side's products and the principal angles, computed twice in a row within
    ``reusing`` (the second time in the buffers the first gave back) and outside it: the same bits."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 40, generator=g)  # float32: widened a band at a time
    X = torch.randn(40, 6, generator=g, dtype=torch.float64)
    A = torch.linalg.qr(torch.randn(300, 6, generator=g, dtype=torch.float64)).Q
    B = torch.linalg.qr(A + 1e-3 * torch.randn(300, 6, generator=g, dtype=torch.float64)).Q

    def compute():
        return gram(x).clone(), long_product(x, X), principal_angles(A, B)

    plain = compute()
    with reusing():
        first, second = compute(), compute()
    for got in (first, second):
        for a, b in zip(plain, got, strict=True):
            assert torch.equal(a, b)
    assert np.allclose(plain[0].numpy(), (x.double().mT @ x.double()).numpy(), rtol=1e-12, atol=1e-10)


def test_a_spare_above_the_limit_is_not_kept(monkeypatch):
    from geometry import buffers

    monkeypatch.setattr(buffers, "KEEP_BYTES", 800)
    with reusing():
        with spare() as small, spare() as big:
            small.take((100,))  # 800 bytes: kept
            big.take((101,))  # 808: let go
        with spare() as again, spare() as other:
            assert again is small and other is not big
