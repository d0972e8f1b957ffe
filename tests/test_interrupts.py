"""Ctrl-C and SIGTERM in the middle of `geometry analyze` (issue 10): the real console process ends within
seconds, says so in one line, exits 130 / 143 and leaves no output directory and no temporary file."""

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from st_bytes import tiny, to_bytes

ROOT = Path(__file__).parent.parent
N_CKPTS = 600  # enough that the analysis is still running when the signal comes, on any machine


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """A base and N_CKPTS fine-tunes: one file under N_CKPTS names (symlinks), steps 1..N in order."""
    d = tmp_path_factory.mktemp("many")
    base = tiny(0)
    (d / "base.safetensors").write_bytes(to_bytes(base))
    (d / "ft.safetensors").write_bytes(to_bytes(tiny(1, 1e-2, base)))
    for i in range(N_CKPTS):
        os.symlink("ft.safetensors", d / f"ft-{i:04d}.safetensors")
    return d


def _wait_for(proc: subprocess.Popen, fd: int, pattern: bytes, timeout: float) -> bytes:
    """What the process wrote to ``fd`` until `pattern` appears."""
    seen, deadline = b"", time.monotonic() + timeout
    while not re.search(pattern, seen) and time.monotonic() < deadline and proc.poll() is None:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # the terminal's other end closed: the process has ended
                break
    return seen


def _rest(fd: int) -> bytes:
    """The rest of a terminal's output once its writer has ended (reading a closed pty raises EIO)."""
    out = b""
    while select.select([fd], [], [], 0.5)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_analysis_leaves_nothing(many, tmp_path, sig, code):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "geometry", "analyze", many / "base.safetensors",
            *sorted(many.glob("ft-*.safetensors")), "-o", out, "--no-figures"]  # progress bar on: the start signal
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    term, stderr = pty.openpty()  # stderr a terminal, as a user's: the bar is drawn there only
    fcntl.ioctl(stderr, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns: room for the bar
    proc = subprocess.Popen(list(map(str, argv)), env=env, stdout=subprocess.PIPE, stderr=stderr)
    os.close(stderr)
    try:
        started = _wait_for(proc, term, rb"\| *[1-9]\d*/\d+ \[", timeout=120)  # the bar has moved: checkpoints read
        assert proc.poll() is None, f"ended before the signal: {started.decode(errors='replace')[-500:]}"
        sent = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = (started + _rest(term)).decode(errors="replace")
    os.close(term)
    proc.stdout.close()
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert proc.returncode == code and last == f"geometry: interrupted by {sig.name}", err[-2000:]
    assert "Traceback" not in err
    print(f"\n{sig.name}: stopped {took:.2f} s after the signal")
    assert took < 5, f"took {took:.1f} s to stop"  # typically well under a second; the margin is for a loaded CI
    assert not out.exists()
    assert not [q for p in (tmp_path, many) for q in p.rglob(".tmp*")]


def test_ctrl_c_waits_while_files_are_renamed_into_an_existing_output():
    """Into an existing directory the files land one rename at a time; a Ctrl-C then is held until all have."""
    from geometry.offline.outputs import _signals_held

    done = False
    with pytest.raises(KeyboardInterrupt):
        with _signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # a pending SIGINT would have been raised by now
            done = True
    assert done


def test_a_read_broken_by_the_signal_reports_the_signal(monkeypatch, capsys):
    """A signal that lands inside a reader's C call can surface as that read failing (a torch error, turned into
    a GeometryError by the reader); the CLI still reports the interruption, not a bad file."""
    from geometry import cli
    from geometry.errors import GeometryError

    def reader_interrupted_mid_read(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises inside the "read" below
            time.sleep(1)
        except BaseException as e:  # noqa: BLE001 - what a C extension does with the handler's exception
            raise GeometryError(f"checkpoint x: cannot read w ({type(e).__name__})") from None

    monkeypatch.setitem(cli.COMMANDS, "analyze", reader_interrupted_mid_read)
    assert cli.main(["analyze", "a", "b"]) == 143
    assert capsys.readouterr().err.strip() == "geometry: interrupted by SIGTERM"
    assert cli.main(["analyze", "a", "b", "--no-such-option"]) == 2  # and the next call starts clean
