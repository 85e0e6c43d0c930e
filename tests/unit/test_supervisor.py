"""The supervisor on its own: spawning, readiness waits, crash detection, staged shutdown, SIGKILL fallback."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from text_generation_launcher.supervisor import (
    ChildExited,
    StopRequested,
    Supervisor,
    describe_returncode,
)

sys.path.insert(0, str(Path(__file__).resolve().parent / "launcher_fakes"))
from procs import alive, python_child  # noqa: E402

# ---- Supervisor on its own -------------------------------------------------------------------------


def test_a_crashing_child_is_reported_by_name_and_code_and_the_others_are_stopped():
    sup = Supervisor(poll_interval=0.02)
    sleeper = sup.spawn("sleeper", python_child("import time; time.sleep(60)"))
    sup.spawn("crasher", python_child("import sys, time; time.sleep(0.3); sys.exit(7)"))
    started = time.monotonic()
    with pytest.raises(ChildExited) as err:
        sup.watch()
    assert err.value.child.name == "crasher" and err.value.returncode == 7
    assert str(err.value) == "crasher exited with exit code 7"
    assert sup.stop([([sleeper], 5.0)]) is True
    assert time.monotonic() - started < 10
    assert not alive(sleeper.pid)


def test_children_found_dead_together_name_the_killed_one_first_and_list_the_rest():
    sup = Supervisor(poll_interval=0.02)
    peer = sup.spawn("shard 0", python_child("import sys; sys.exit(1)"))
    victim = sup.spawn("shard 1", python_child("import time; time.sleep(60)"))
    os.kill(victim.pid, signal.SIGKILL)
    for child in (peer, victim):
        child.process.wait(10)
    with pytest.raises(ChildExited) as err:
        sup.check()
    assert err.value.child is victim
    assert str(err.value) == "shard 1 exited with signal SIGKILL (also exited: shard 0 with exit code 1)"


def test_wait_ready_fails_fast_when_the_child_dies_before_ready():
    sup = Supervisor(poll_interval=0.02)
    child = sup.spawn("shard 0", python_child("import sys; sys.exit(5)"))
    with pytest.raises(ChildExited, match="shard 0 exited with exit code 5"):
        sup.wait_ready(child, lambda: False, timeout=30)


def test_wait_ready_returns_once_the_probe_passes_and_stop_request_interrupts(tmp_path):
    sup = Supervisor(poll_interval=0.02)
    flag = tmp_path / "ready"
    child = sup.spawn("worker", python_child(f"import time, pathlib; time.sleep(0.3); pathlib.Path({str(flag)!r}).touch(); time.sleep(60)"))
    assert sup.wait_ready(child, flag.exists, timeout=30, probe_interval=0.05) >= 0.3
    sup.request_stop()
    with pytest.raises(StopRequested):
        sup.watch()
    sup.stop([([child], 5.0)])


def test_a_child_ignoring_sigterm_is_killed_after_the_grace_period():
    sup = Supervisor(poll_interval=0.02)
    stubborn = sup.spawn(
        "stubborn", python_child("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('x', flush=True); time.sleep(60)")
    )
    time.sleep(0.5)  # let it install the handler
    started = time.monotonic()
    assert sup.stop([([stubborn], 0.5)]) is False
    assert 0.5 <= time.monotonic() - started < 10
    assert stubborn.process.returncode == -signal.SIGKILL
    assert not alive(stubborn.pid)


def test_stages_stop_in_order_and_a_second_request_resignals_the_current_stage(tmp_path):
    log = tmp_path / "log"
    drainer = (
        "import signal, sys, time\n"
        f"log = open({str(log)!r}, 'a')\n"
        "count = []\n"
        "def on(s, f):\n"
        "    count.append(s); log.write(f'router sigterm {time.time()}\\n'); log.flush()\n"
        "signal.signal(signal.SIGTERM, on)\n"
        "while len(count) < 2: time.sleep(0.01)\n"  # drains until the second signal
        "log.write(f'router exit {time.time()}\\n'); log.flush()\n"
    )
    shard = (
        "import signal, sys, time\n"
        f"log = open({str(log)!r}, 'a')\n"
        "def on(s, f):\n"
        "    log.write(f'shard sigterm {time.time()}\\n'); log.flush(); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, on)\n"
        "time.sleep(60)\n"
    )
    sup = Supervisor(poll_interval=0.02)
    shards = [sup.spawn(f"shard {i}", python_child(shard)) for i in range(2)]
    router = sup.spawn("router", python_child(drainer))
    time.sleep(0.7)

    threading.Timer(0.5, sup.request_stop).start()  # the "second signal" during the drain
    assert sup.stop([([router], 20.0), (shards, 5.0)]) is True
    events = [line.split() for line in log.read_text().splitlines()]
    names = [f"{who} {what}" for who, what, _ in events]
    assert names[:3] == ["router sigterm", "router sigterm", "router exit"], names
    assert sorted(names[3:]) == ["shard sigterm", "shard sigterm"]
    router_exit = float(events[2][2])
    assert all(float(t) >= router_exit for _, _, t in events[3:])


def test_children_run_in_their_own_process_group():
    sup = Supervisor()
    child = sup.spawn("c", python_child("import time; time.sleep(60)"))
    try:
        assert os.getpgid(child.pid) == child.pid != os.getpgid(0)
    finally:
        sup.stop([([child], 5.0)])


def test_describe_returncode_names_signals():
    assert describe_returncode(3) == "exit code 3"
    assert describe_returncode(-9) == "signal SIGKILL"


def test_missing_executable_is_a_clear_start_error():
    from text_generation_launcher.supervisor import ChildStartError

    with pytest.raises(ChildStartError, match="cannot start shard 0 .*/nonexistent/text-generation-server"):
        Supervisor().spawn("shard 0", ["/nonexistent/text-generation-server", "serve"])
