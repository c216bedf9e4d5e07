"""Tests for ltgbert.preemption: the flag, and a process that saves and exits 75 on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from ltgbert.preemption import EXIT_PREEMPTED, PreemptionHandler

REPO = Path(__file__).resolve().parents[1]


def test_flag_set_by_signal():
    handler = PreemptionHandler()
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        assert handler.install() is handler
        handler.install()  # idempotent: the handlers to restore stay the original ones
        assert not handler.requested and handler.signal_name is None
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not handler.requested and time.monotonic() < deadline:
            time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread
        assert handler.requested and handler.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # the process survives; the first signal's name is kept
        time.sleep(0.05)
        assert handler.signal_name == "SIGUSR1"
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == previous
    assert EXIT_PREEMPTED == 75


def test_subprocess_saves_and_exits_75_on_sigterm(tmp_path):
    marker = tmp_path / "saved.txt"
    script = textwrap.dedent(
        f"""
        import importlib.util, sys, time
        # Loaded by path: the module is stdlib-only, and skipping the package __init__ keeps start-up fast.
        spec = importlib.util.spec_from_file_location("preemption", {str(REPO / "ltgbert" / "preemption.py")!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        EXIT_PREEMPTED, PreemptionHandler = module.EXIT_PREEMPTED, module.PreemptionHandler
        handler = PreemptionHandler().install()
        print("ready", flush=True)
        step = 0
        while step < 100000:
            time.sleep(0.01)  # one "training step"
            step += 1
            if handler.requested:
                open({str(marker)!r}, "w").write(f"{{handler.signal_name}} {{step}}")
                sys.exit(EXIT_PREEMPTED)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == EXIT_PREEMPTED
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    name, step = marker.read_text().split()
    assert name == "SIGTERM" and int(step) >= 1
