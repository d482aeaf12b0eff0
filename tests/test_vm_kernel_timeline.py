"""The phase timer the launcher fills and `make bench` prints (pure: a fake clock)."""

from __future__ import annotations

import itertools

from mktme_emu.vm import timeline
from mktme_emu.vm.timeline import PhaseMark, PhaseTimer, Step, steps


def test_first_mark_of_a_name_wins_and_order_is_kept() -> None:
    ticks = itertools.count(10.0, 0.5)
    timer = PhaseTimer(clock=lambda: next(ticks))
    timer.mark(timeline.QEMU_STARTED)
    timer.mark(timeline.INIT_HELLO, "1.25 0.90")
    timer.mark(timeline.INIT_HELLO, "9.99")  # a second boot's hello does not move the first
    assert timer.marks() == (PhaseMark(timeline.QEMU_STARTED, 10.0),
                             PhaseMark(timeline.INIT_HELLO, 10.5, "1.25 0.90"))


def test_hello_is_split_by_the_kernel_clock() -> None:
    marks = [PhaseMark(timeline.GUEST_RUNNING, 1.0), PhaseMark(timeline.INIT_HELLO, 4.0, "2.5 1.0"),
             PhaseMark(timeline.COMMAND_START, 4.25)]
    assert steps(marks, 0.0) == [Step(timeline.GUEST_RUNNING, 1.0),
                                 Step("firmware and loader", 0.5),
                                 Step("kernel to init (kernel clock)", 2.5),
                                 Step(timeline.COMMAND_START, 0.25)]


def test_implausible_uptime_is_not_split() -> None:
    # an uptime longer than the wait (a rebooted guest, a bad report): shown as measured
    marks = [PhaseMark(timeline.INIT_HELLO, 2.0, "30.0"), PhaseMark(timeline.TEARDOWN, 3.0)]
    assert steps(marks, 1.0) == [Step(timeline.INIT_HELLO, 1.0), Step(timeline.TEARDOWN, 1.0)]
    assert steps([PhaseMark(timeline.INIT_HELLO, 2.0, "")], 1.0) == [Step(timeline.INIT_HELLO, 1.0)]
