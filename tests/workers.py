"""Launch a worker script on two CPU processes (gloo), as torchrun would: the harness of the multi-process tests."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def tiny_llama_source(layers: int) -> str:
    """Source of ``tiny_llama()``, the seeded model every worker and its single-process reference build."""
    return textwrap.dedent(f"""
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        def tiny_llama():
            torch.manual_seed(0)
            cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers={layers},
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
            return LlamaForCausalLM(cfg)
    """)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, args: list[str], *, env: dict | None = None, timeout: float = 180,
           what: str = "workers") -> list[str]:
    """Run ``script args`` as ranks 0 and 1 of a 2-process group; their logs (stdout and stderr). A rank that
    fails or a deadlock (timeout) fails the test with that rank's log."""
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
            **(env or {})}
    procs = [subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{what} timed out (a deadlock in the gathers?)")
    for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"
    return logs


def single_process_store(common: str, run: Path, config: dict, steps: int, train_step) -> Path:
    """The reference a multi-process run is checked against: the same steps in this process, one thread, plain
    SGD, recorded into ``run``. ``common``: the workers' shared source (defines tiny_llama); ``train_step(ns,
    model, opt, t)`` takes one optimizer step using its names."""
    import torch

    from geometry.capture.recorder import Recorder, RecorderConfig

    ns: dict = {}
    exec(common, ns)
    model = ns["tiny_llama"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Recorder(model, run, RecorderConfig(**config)) as rec:
            for t in range(1, steps + 1):
                train_step(ns, model, opt, t)
                rec.step(t)
    finally:
        torch.set_num_threads(threads)
    return run
