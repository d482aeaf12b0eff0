"""A backend (the real service code) served on a thread of the test process.

For what a separate ``serve`` process cannot stage: a controller that holds a
request at a chosen moment, or fails one.  The controller is the Backend's
parameter, so a test wraps the real one (:class:`GatedController`) instead of
patching anything private.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from mktme_emu.controller import ControllerConfig, MemoryController, open_controller
from mktme_emu.service import Backend, ServiceConfig

SIZE, BASE = 4 << 20, 0x1_0000_0000


def new_controller(root: Path) -> MemoryController:
    return open_controller(ControllerConfig(state_dir=root / "state", size=SIZE, base=BASE,
                                             view_path=root / "view"))


@contextlib.contextmanager
def served(controller: object, root: Path, *, guest: bool = True, busy_timeout: float = 5.0,
           max_connections: int = 64) -> Iterator[Backend]:
    """Serve ``controller`` on ROOT/admin.sock (and ROOT/guest.sock) until the block ends."""
    service = Backend(controller, ServiceConfig(  # type: ignore[arg-type]
        admin_socket=root / "admin.sock", guest_socket=root / "guest.sock" if guest else None,
        busy_timeout=busy_timeout, max_connections=max_connections))
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    failure: list[BaseException] = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(service.serve(ready.set, install_signals=False))
        except BaseException as exc:
            failure.append(exc)
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    if failure:
        thread.join(10)
        raise failure[0]
    try:
        yield service
    finally:
        loop.call_soon_threadsafe(service.stop)
        thread.join(30)
        assert not thread.is_alive()


class GatedController:
    """The real controller, except that each flush waits for a permit.

    ``arrived`` is released when a flush reaches the controller, so a test
    knows the backend is inside that request; ``permit()`` lets one through.
    """

    def __init__(self, inner: MemoryController) -> None:
        self._inner = inner
        self.arrived = threading.Semaphore(0)
        self._permits = threading.Semaphore(0)

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def permit(self, count: int = 1) -> None:
        self._permits.release(count)

    def flush(self, *args: int) -> object:
        self.arrived.release()
        if not self._permits.acquire(timeout=60):
            raise AssertionError("a flush waited 60 s for its permit")
        return self._inner.flush(*args)
