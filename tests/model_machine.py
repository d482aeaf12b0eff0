"""The rule-based state machine shared by the model-based tests.

Not a test module.  :class:`ModelMachine` drives a :class:`Device` (the
controller in-process, or a ``serve`` process over its socket) and the
:class:`~reference_model.ReferenceModel` with the same random requests,
and after every step compares:

- the view (read through the test's own shared mapping of the view file,
  as QEMU maps it) with the plaintext the model expects, byte by byte
  where the model knows it;
- the media file with the model's durable state, decrypted with the
  independent XTS reference of ``backend_helpers`` for every page whose key
  the test knows (plaintext, user keys, the retained platform key);
- the untouched rest of the media: still all zeros.

A request the model refuses must be refused by the device with the same
error class, and then the next check shows that nothing changed.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
from backend_helpers import xts_reference
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from reference_model import (
    PAGE,
    PLAIN,
    Command,
    DeviceSpec,
    Key,
    MediaPage,
    ReferenceModel,
    Refusal,
    Refused,
    Tme,
    TweakMode,
)

BASE = 0x1_0000_0000
BASES = (BASE, BASE + (2 << 20), 0x2_4000_0000)
DEVICE_SIZE = 2 << 20  # the smallest device the controller accepts
WINDOW = 8  # pages the machine acts on
KEYID_BITS = 2  # KeyIDs 0..3: few enough that they collide often

# A small pool, so the same user key comes back (and unlocks pages); the last
# one has equal halves, which XTS forbids.
USER_KEYS = (
    bytes(range(1, 17)) + bytes(range(101, 117)),
    bytes(range(31, 47)) + bytes(range(131, 147)),
    bytes(range(61, 93)) + bytes(range(161, 193)),  # XTS-256
    bytes(16) + bytes(16),
)
LOGICAL_TWEAKS = (None, 0, 3, 1 << 20, (1 << 40) + 7)


class DeviceRefused(Exception):
    """The device refused a request; ``why`` is the model's name for its error class."""

    def __init__(self, why: Refusal, message: str) -> None:
        super().__init__(message)
        self.why = why


class Device(Protocol):
    """What the machine needs from a device under test (bytes offsets, like the wire)."""

    def program(self, keyid: int, command: Command, secret: bytes) -> int: ...
    def map(self, offset: int, length: int, keyid: int, logical_tweak: int | None) -> None: ...
    def flush(self, offset: int | None, length: int | None) -> None: ...
    def relocate(self, src: int, dst: int, length: int, keyed: bool) -> None: ...
    def power_cycle(self) -> None: ...
    def restart(self, base: int | None = None) -> None: ...
    def crash_and_restart(self) -> None: ...
    def view_fd(self) -> int: ...
    def inspect(self, offset: int, count: int) -> list[PageReport]: ...
    def media(self) -> bytes: ...
    def platform_key(self) -> bytes | None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class PageReport:
    """What INSPECT says about one page (the parts the model predicts)."""

    keyid: int
    logical_tweak: int
    locked: bool
    consistent: bool | None  # media == write-back(view); None when locked


@dataclass(frozen=True)
class Shape:
    """One device configuration the machine runs on."""

    unit: int
    tweak: TweakMode
    tme: Tme = Tme.BYPASS

    def spec(self) -> DeviceSpec:
        return DeviceSpec(pages=WINDOW, keyid_bits=KEYID_BITS, tweak=self.tweak, base=BASE,
                          tme=self.tme, device_pages=DEVICE_SIZE // PAGE)


def budget(default_examples: int, default_steps: int) -> settings:
    """Hypothesis settings: small and repeatable by default, bigger under MKTME_MODEL_EXAMPLES.

    With the variable set, exploration is random (seeded by MKTME_MODEL_SEED
    when given); the seed used is printed on failure by :func:`run_machine`.
    """
    examples = int(os.environ.get("MKTME_MODEL_EXAMPLES", default_examples))
    steps = int(os.environ.get("MKTME_MODEL_STEPS", default_steps))
    phases = list(Phase)
    if os.environ.get("MKTME_MODEL_SHRINK", "1") == "0":  # mutation runs: found is enough
        phases.remove(Phase.shrink)
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                    derandomize=not exploring(), database=None, print_blob=True, phases=phases,
                    suppress_health_check=list(HealthCheck))


def exploring() -> bool:
    return "MKTME_MODEL_EXAMPLES" in os.environ or "MKTME_MODEL_SEED" in os.environ


@contextlib.contextmanager
def scratch_root(fallback: Path) -> Iterator[Path]:
    """A directory on tmpfs when there is one: the controller fdatasyncs at every
    request, which on a busy disk would make the steps ten times slower and the
    budget ten times smaller, and durability against power loss is not what
    this test is about (SIGKILL and restart are, and tmpfs keeps files across them)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield fallback
        return
    root = Path(tempfile.mkdtemp(prefix="mktme-model-", dir=shm))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_machine(machine: type[ModelMachine], root: Path, config: settings) -> None:
    """Run the machine under ``config``; on failure, say how to repeat it."""
    from hypothesis import seed
    from hypothesis.stateful import run_state_machine_as_test

    machine.root = root
    chosen = None
    if exploring():
        chosen = int(os.environ.get("MKTME_MODEL_SEED", random.getrandbits(32)))
        machine = seed(chosen)(machine)
    try:
        run_state_machine_as_test(machine, settings=config)
    except BaseException as err:
        how = (f"MKTME_MODEL_EXAMPLES={config.max_examples} MKTME_MODEL_STEPS="
               f"{config.stateful_step_count} MKTME_MODEL_SEED={chosen}"
               if chosen is not None else "the default derandomized run")
        err.add_note(f"model machine {machine.__name__}: repeat with {how}")
        print(f"model machine {machine.__name__} failed; repeat with {how}")
        raise


class ModelMachine(RuleBasedStateMachine):
    """Random requests against a device and the reference model, checked every step."""

    shape: ClassVar[Shape]
    root: ClassVar[Path]
    refuse_map_to_locked: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="m", dir=self.root))
        self.model = ReferenceModel(self.shape.spec())
        self.device = self.open_device(self.dir)
        self._map: mmap.mmap | None = None
        self._map_view()
        self._verified: dict[int, tuple[bytes, Key, int, bytes, bytes]] = {}
        self._last_media: dict[int, tuple[MediaPage, bytes]] = {}

    def open_device(self, root: Path) -> Device:
        raise NotImplementedError

    def _map_view(self) -> None:
        """Map the view shared, as QEMU does, through the descriptor the device hands out."""
        fd = self.device.view_fd()
        try:
            self._map = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    def teardown(self) -> None:
        try:
            if self._map is not None:
                with contextlib.suppress(BufferError):
                    self._map.close()
            self.device.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- driving both sides -------------------------------------------------------

    def _both(self, model_call: Callable[[], object], device_call: Callable[[], object]) -> None:
        """Apply a request to the model; the device must accept or refuse it alike."""
        try:
            model_call()
        except Refused as refusal:
            try:
                device_call()
            except DeviceRefused as err:
                assert err.why is refusal.why, f"refused as {err.why}, model says {refusal.why}: {err}"
                return
            raise AssertionError(f"device accepted a request the model refuses: {refusal}") from None
        try:
            device_call()
        except DeviceRefused as err:
            raise AssertionError(f"device refused a request the model accepts: {err}") from None

    @initialize(commands=st.lists(st.sampled_from(Command), min_size=3, max_size=3),
                keys=st.lists(st.sampled_from(USER_KEYS[:3]), min_size=3, max_size=3),
                keyids=st.lists(st.integers(0, (1 << KEYID_BITS) - 1), min_size=WINDOW, max_size=WINDOW),
                tweaks=st.lists(st.sampled_from(LOGICAL_TWEAKS), min_size=WINDOW, max_size=WINDOW),
                seed=st.integers(0, 2**32 - 1), flush=st.booleans())
    def populate(self, commands: list[Command], keys: list[bytes], keyids: list[int],
                 tweaks: list[int | None], seed: int, flush: bool) -> None:
        """Start each run from a busy device: KeyIDs 1..3 programmed, every page
        mapped and written, so that short step sequences already move real data."""
        for keyid, (command, key) in enumerate(zip(commands, keys, strict=True), start=1):
            self.program(keyid, command, key)
        for page in range(WINDOW):
            self.map(page, 1, keyids[page], tweaks[page])
        self.guest_write(0, WINDOW * PAGE, seed)
        if flush:
            self.flush_all()

    @rule(keyid=st.integers(0, (1 << KEYID_BITS) - 1), command=st.sampled_from(Command),
          key=st.sampled_from(USER_KEYS))
    def program(self, keyid: int, command: Command, key: bytes) -> None:
        secret = key if command is Command.SET_KEY_DIRECT else b""
        expected = self.model.program(keyid, command, secret)
        status = self.device.program(keyid, command, secret)
        assert status == expected, f"PCONFIG status {status}, model says {expected!r}"

    @rule(start=st.integers(0, WINDOW - 1), count=st.integers(1, 4),
          keyid=st.integers(0, (1 << KEYID_BITS) - 1), tweak=st.sampled_from(LOGICAL_TWEAKS))
    def map(self, start: int, count: int, keyid: int, tweak: int | None) -> None:
        count = min(count, WINDOW - start)
        if self.shape.tweak is not TweakMode.LOGICAL:
            tweak = None  # refused_request covers a logical tweak in another mode
        self._both(lambda: self.model.map(start, count, keyid, tweak, self.refuse_map_to_locked),
                   lambda: self.device.map(start * PAGE, count * PAGE, keyid, tweak))

    @rule(offset=st.integers(0, WINDOW * PAGE - 1), length=st.integers(1, 2 * PAGE),
          seed=st.integers(0, 2**32 - 1))
    def guest_write(self, offset: int, length: int, seed: int) -> None:
        length = min(length, WINDOW * PAGE - offset)
        data = random.Random(seed).randbytes(length)
        self.model.write(offset, data)
        assert self._map is not None
        self._map[offset:offset + length] = data

    @rule()
    def flush_all(self) -> None:
        self.model.flush()
        self.device.flush(None, None)

    @rule(start=st.integers(0, WINDOW - 1), count=st.integers(1, 4))
    def flush_range(self, start: int, count: int) -> None:
        count = min(count, WINDOW - start)
        self._both(lambda: self.model.flush(start, count),
                   lambda: self.device.flush(start * PAGE, count * PAGE))

    @rule(src=st.integers(0, WINDOW - 1), dst=st.integers(0, WINDOW - 1), count=st.integers(1, 3),
          keyed=st.booleans())
    def relocate(self, src: int, dst: int, count: int, keyed: bool) -> None:
        count = min(count, WINDOW - src, WINDOW - dst)
        self._both(lambda: self.model.relocate(src, dst, count, keyed),
                   lambda: self.device.relocate(src * PAGE, dst * PAGE, count * PAGE, keyed))

    @rule(which=st.sampled_from(["unaligned", "beyond", "empty", "keyid", "tweak"]),
          op=st.sampled_from(["map", "flush", "relocate"]))
    def refused_request(self, which: str, op: str) -> None:
        """Requests outside whole pages of the data area, or with a bad KeyID or tweak,
        are refused; the checks after the step show that they changed nothing."""
        keyid, tweak = 1, None
        if which == "keyid":
            op, keyid = "map", 1 << KEYID_BITS
        elif which == "tweak":
            if self.shape.tweak is TweakMode.LOGICAL:
                return
            op, tweak = "map", 5
        offset, length = {"unaligned": (PAGE + 512, PAGE), "beyond": (DEVICE_SIZE - PAGE, 2 * PAGE),
                          "empty": (PAGE, 0)}.get(which, (0, PAGE))
        if op == "flush" and which == "empty":
            return  # on the wire, length 0 means "everything"
        call = {"map": lambda: self.device.map(offset, length, keyid, tweak),
                "flush": lambda: self.device.flush(offset, length),
                "relocate": lambda: self.device.relocate(offset, WINDOW * PAGE, length, False)}[op]
        with self._expect_refusal(Refusal.RANGE if which in ("unaligned", "beyond", "empty")
                                  else Refusal.INVALID):
            call()

    @contextlib.contextmanager
    def _expect_refusal(self, why: Refusal) -> Iterator[None]:
        try:
            yield
        except DeviceRefused as err:
            assert err.why is why, f"refused as {err.why}, expected {why}: {err}"
        else:
            raise AssertionError(f"device accepted a request that must be refused ({why})")

    @rule()
    def power_cycle(self) -> None:
        self.model.power_cycle()
        self.device.power_cycle()

    @rule()
    def restart(self) -> None:
        """A clean backend restart (close, reopen on the same state dir and view)."""
        self.model.restart(clean=True)
        self.device.restart()

    @rule(base=st.sampled_from(BASES))
    def restart_elsewhere(self, base: int) -> None:
        """A clean restart with the NVDIMM at another (or the same) physical base."""
        self.model.restart(clean=True)
        self.model.set_base(base)
        self.device.restart(base)

    @rule()
    def crash_and_restart(self) -> None:
        """A crash (SIGKILL, or an abandoned controller) and a restart: only what was
        written back before is on the media; the view file survives and is re-attached."""
        self.model.restart(clean=False)
        self.device.crash_and_restart()

    # -- the checks ---------------------------------------------------------------

    @invariant()
    def view_matches_model(self) -> None:
        assert self._map is not None
        view = np.frombuffer(self._map, np.uint8, WINDOW * PAGE).reshape(WINDOW, PAGE)
        for n, page in enumerate(self.model.pages):
            known = np.frombuffer(page.view.known, np.bool_)
            if not known.any():
                continue
            expected = np.frombuffer(page.view.data, np.uint8)
            bad = np.flatnonzero((view[n] != expected) & known)
            assert bad.size == 0, (f"view page {n} (KeyID {page.keyid}) differs from the model "
                                   f"at {bad.size} known bytes, first at {int(bad[0])}")

    @invariant()
    def page_state_matches_model(self) -> None:
        """INSPECT: each page's KeyID, logical tweak and lock as the model has them,
        and a page the guest has not written since its fill is consistent."""
        for n, report in enumerate(self.device.inspect(0, WINDOW)):
            page = self.model.pages[n]
            assert report.keyid == page.keyid, f"page {n} has KeyID {report.keyid}, model {page.keyid}"
            if self.shape.tweak is TweakMode.LOGICAL:
                assert report.logical_tweak == page.logical_tweak, (
                    f"page {n} has logical tweak {report.logical_tweak}, model {page.logical_tweak}")
            locked = page.keyid in self.model.locked
            assert report.locked == locked, f"page {n} locked={report.locked}, model says {locked}"
            if not locked and not page.dirty:
                assert report.consistent is True, f"page {n}: view and media disagree after a fill"

    @invariant()
    def media_matches_model(self) -> None:
        media = self.device.media()
        assert len(media) == DEVICE_SIZE
        rest = np.frombuffer(media, np.uint8)[WINDOW * PAGE:]
        assert not rest.any(), "media outside the pages the test touched changed"
        for n in range(WINDOW):
            self._check_media_page(n, media[n * PAGE:(n + 1) * PAGE])

    def _check_media_page(self, n: int, cells: bytes) -> None:
        durable = self.model.pages[n].media
        seen = self._last_media.get(n)
        if seen is not None and seen[0] is durable:
            assert cells == seen[1], f"media page {n} changed though the model wrote nothing there"
        self._last_media[n] = (durable, cells)
        known = bytes(durable.plain.known)
        if not any(known):
            return
        fingerprint = (cells, durable.key, durable.tweak, bytes(durable.plain.data), known)
        if self._verified.get(n) == fingerprint:
            return  # checked before with these exact bytes and this exact expectation
        secret = self._secret(durable.key)
        if secret is None:  # a key the test cannot know: random, ephemeral
            self._check_unknowable(n, cells, durable)
            return
        plain = cells if secret == b"" else xts_reference(
            secret, cells, self._unit_tweaks(durable.tweak), self.shape.unit, decrypt=True)
        got, expected = np.frombuffer(plain, np.uint8), np.frombuffer(durable.plain.data, np.uint8)
        bad = np.flatnonzero((got != expected) & np.frombuffer(known, np.bool_))
        assert bad.size == 0, (f"media page {n} does not decrypt to the model's durable contents "
                               f"({durable.key.kind} key, tweak {durable.tweak:#x}): "
                               f"{bad.size} bytes differ, first at {int(bad[0])}")
        self._verified[n] = fingerprint

    def _check_unknowable(self, n: int, cells: bytes, durable: MediaPage) -> None:
        """Media under a key the test cannot know must at least not be the plaintext."""
        known = np.frombuffer(durable.plain.known, np.bool_)
        same = np.frombuffer(cells, np.uint8) == np.frombuffer(durable.plain.data, np.uint8)
        assert known.sum() < 16 or not same[known].all(), \
            f"media page {n} holds the plaintext of a {durable.key.kind}-keyed page"

    def _unit_tweaks(self, tweak_base: int) -> list[int]:
        unit = self.shape.unit
        return [tweak_base + i * unit for i in range(PAGE // unit)]

    def _secret(self, key: Key) -> bytes | None:
        """The XTS key for a key identity; b"" for plaintext, None when unknowable."""
        if key == PLAIN:
            return b""
        if key.kind == "user":
            return key.secret
        if key.kind == "platform" and self.shape.tme is Tme.RETAINED:
            return self.device.platform_key()
        return None
