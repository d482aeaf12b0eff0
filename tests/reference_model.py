"""A small, pure reference model of the memory controller (SPEC section 3).

Not a test module: the model-based tests (``test_model_controller.py``,
``test_model_serve.py``) drive the real controller and this model with the
same random requests and compare them after every step.

What the model keeps is *meaning*, not bytes: it never encrypts.  The media
of a page is described as "the encryption of this plaintext under this key
identity at this tweak" (:class:`MediaPage`), and the view of a page as the
plaintext the CPU sees (:class:`Contents`).  Bytes whose value the SPEC
leaves open (old contents read through another key: "garbage") are
*unknown*: the model marks them so and never checks them, until the guest
writes them.  The tests turn a :class:`MediaPage` into checkable bytes with
the independent XTS reference of ``backend_helpers``; a key identity the test
cannot know (a random key, the ephemeral platform key) leaves that page's
media unchecked.

Only a window of ``pages`` pages at the start of the device is modelled;
the tests never touch the rest.  The model assumes what the SPEC says about
the coherence rules and nothing about how the controller implements them:
it only relies on two facts about XTS, that decryption with the key and
tweak of an encryption gives the plaintext back, and that writing back a
view the guest did not touch leaves the media as it was (encryption is a
permutation of whole data units, and write-back is exact).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

PAGE = 4096


class TweakMode(enum.Enum):
    SPA = "spa"
    DPA = "dpa"
    LOGICAL = "logical"


class Tme(enum.Enum):
    BYPASS = "bypass"
    EPHEMERAL = "ephemeral"
    RETAINED = "retained"


class Command(enum.IntEnum):
    """The PCONFIG commands (same numbers as the struct's command byte)."""

    SET_KEY_DIRECT = 0
    SET_KEY_RANDOM = 1
    CLEAR_KEY = 2
    NO_ENCRYPT = 3


class Status(enum.IntEnum):
    """PCONFIG statuses the model predicts (same numbers as the hardware's)."""

    PROG_SUCCESS = 0
    INVALID_PROG_CMD = 1
    INVALID_KEYID = 3


class Refusal(enum.Enum):
    """Why a request is refused (the test maps these to protocol error codes)."""

    INVALID = "invalid"
    RANGE = "range"
    NO_KEY = "no_key"


class Refused(Exception):
    """The model says this request must be refused, with nothing changed."""

    def __init__(self, why: Refusal, message: str) -> None:
        super().__init__(message)
        self.why = why


@dataclass(frozen=True)
class Key:
    """The identity of what a KeyID encrypts with.

    ``plain``: no encryption (bypass, NO_ENCRYPT, unprogrammed under bypass).
    ``user``: a SET_KEY_DIRECT key, ``secret`` = data key || tweak key.
    ``random``: the ``serial``-th SET_KEY_RANDOM (never the same twice).
    ``platform``: the TME platform key; ``serial`` counts ephemeral ones.
    """

    kind: str
    secret: bytes = b""
    serial: int = 0


PLAIN = Key("plain")


@dataclass
class Contents:
    """A page of plaintext: ``data`` where ``known`` is 1, anything elsewhere."""

    data: bytearray = field(default_factory=lambda: bytearray(PAGE))
    known: bytearray = field(default_factory=lambda: bytearray(b"\1" * PAGE))

    @classmethod
    def unknown(cls) -> Contents:
        return cls(bytearray(PAGE), bytearray(PAGE))

    def copy(self) -> Contents:
        return Contents(bytearray(self.data), bytearray(self.known))


@dataclass
class MediaPage:
    """media = encrypt(key, tweak, plain); ``tweak`` is the tweak base of the
    page's first data unit when it was written (meaningless for ``PLAIN``)."""

    key: Key
    tweak: int
    plain: Contents

    def copy(self) -> MediaPage:
        return MediaPage(self.key, self.tweak, self.plain.copy())


@dataclass
class Page:
    keyid: int
    logical_tweak: int
    media: MediaPage
    view: Contents
    dirty: bool = False  # the guest wrote the view since its last fill or write-back


@dataclass(frozen=True)
class DeviceSpec:
    pages: int  # the modelled window (the device may be larger)
    keyid_bits: int
    tweak: TweakMode
    base: int
    tme: Tme = Tme.BYPASS
    device_pages: int | None = None  # the whole device, for range checks

    @property
    def keyid_count(self) -> int:
        return 1 << self.keyid_bits


@dataclass(frozen=True)
class Slot:
    """What a KeyID was last programmed to: ``tme`` (nothing), ``user``,
    ``random`` or ``no_encrypt``; ``key`` is None for tme and no_encrypt."""

    kind: str = "tme"
    key: Key | None = None


class ReferenceModel:
    """The coherence rules of SPEC section 3, one page at a time."""

    def __init__(self, spec: DeviceSpec) -> None:
        self.spec = spec
        self.base = spec.base  # the NVDIMM's guest physical base; a restart may move it
        self.slots = [Slot() for _ in range(spec.keyid_count)]
        self.locked: set[int] = set()
        self.platform_serial = 0
        self.random_serial = 0
        zeros = MediaPage(PLAIN, 0, Contents())  # a new media file is all zeros
        self.pages = [Page(0, n, zeros.copy(), Contents()) for n in range(spec.pages)]
        for n in range(spec.pages):
            self._fill(n)

    # -- what a KeyID does ------------------------------------------------------

    def platform_key(self) -> Key:
        return PLAIN if self.spec.tme is Tme.BYPASS else Key("platform", serial=self.platform_serial)

    def key_of(self, keyid: int) -> Key:
        """The key a KeyID encrypts with now (ignoring locks)."""
        slot = self.slots[keyid]
        if slot.kind == "no_encrypt":
            return PLAIN
        if slot.kind == "tme":
            return self.platform_key()
        assert slot.key is not None
        return slot.key

    def tweak_of(self, page: int) -> int:
        """Tweak base of the page's first data unit (SPEC: "an address of the unit")."""
        if self.spec.tweak is TweakMode.SPA:
            return self.base + page * PAGE
        if self.spec.tweak is TweakMode.DPA:
            return page * PAGE
        return self.pages[page].logical_tweak * PAGE

    # -- the two primitives: fill and write-back ----------------------------------

    def _fill(self, n: int) -> None:
        """view = decrypt(key of its KeyID, tweak, media); locked: the raw cells."""
        page = self.pages[n]
        key = PLAIN if page.keyid in self.locked else self.key_of(page.keyid)
        media = page.media
        same = media.key == key and (key == PLAIN or media.tweak == self.tweak_of(n))
        page.view = media.plain.copy() if same else Contents.unknown()
        page.dirty = False

    def _write_back(self, n: int) -> None:
        """media = encrypt(key, tweak, view), unless the guest wrote nothing
        (the media already holds exactly that) or the KeyID is locked."""
        page = self.pages[n]
        if not page.dirty or page.keyid in self.locked:
            return
        page.media = MediaPage(self.key_of(page.keyid), self.tweak_of(n), page.view.copy())
        page.dirty = False

    # -- requests: validate (raise Refused, nothing changed), then act ---------------

    def check_range(self, start: int, count: int) -> range:
        total = self.spec.device_pages or self.spec.pages
        if count <= 0 or start < 0 or start + count > total:
            raise Refused(Refusal.RANGE, f"pages {start}+{count} outside the device")
        if start + count > self.spec.pages:
            raise AssertionError("the tests only act inside the modelled window")
        return range(start, start + count)

    def program(self, keyid: int, command: Command, secret: bytes = b"") -> Status:
        """PCONFIG: pages of the KeyID are written back under the old key, filled under the new."""
        if not 0 < keyid < self.spec.keyid_count:
            return Status.INVALID_KEYID
        half = len(secret) // 2
        if command is Command.SET_KEY_DIRECT and secret[:half] == secret[half:]:
            return Status.INVALID_PROG_CMD  # XTS forbids a data key equal to its tweak key
        affected = [n for n, page in enumerate(self.pages) if page.keyid == keyid]
        for n in affected:
            self._write_back(n)
        if command is Command.SET_KEY_DIRECT:
            self.slots[keyid] = Slot("user", Key("user", secret))
        elif command is Command.SET_KEY_RANDOM:
            self.random_serial += 1
            self.slots[keyid] = Slot("random", Key("random", serial=self.random_serial))
        elif command is Command.CLEAR_KEY:
            self.slots[keyid] = Slot()
        else:
            self.slots[keyid] = Slot("no_encrypt")
        self.locked.discard(keyid)
        for n in affected:
            self._fill(n)
        return Status.PROG_SUCCESS

    def map(self, start: int, count: int, keyid: int, logical_tweak: int | None = None,
            refuse_locked: bool = False) -> None:
        """encrypt_mprotect: write back under the old KeyID, fill under the new one."""
        pages = self.check_range(start, count)
        if not 0 <= keyid < self.spec.keyid_count:
            raise Refused(Refusal.INVALID, f"KeyID {keyid} out of range")
        if logical_tweak is not None and self.spec.tweak is not TweakMode.LOGICAL:
            raise Refused(Refusal.INVALID, "a logical tweak needs logical tweak mode")
        if refuse_locked and keyid in self.locked:
            raise Refused(Refusal.NO_KEY, f"KeyID {keyid} lost its key")
        for n in pages:
            self._write_back(n)
        for k, n in enumerate(pages):
            self.pages[n].keyid = keyid
            if logical_tweak is not None:
                self.pages[n].logical_tweak = logical_tweak + k
            self._fill(n)

    def write(self, offset: int, data: bytes) -> None:
        """The guest CPU stores into the view (any bytes, any alignment)."""
        assert offset >= 0 and offset + len(data) <= self.spec.pages * PAGE
        end = offset + len(data)
        while offset < end:
            n, b = divmod(offset, PAGE)
            piece = min(end - offset, PAGE - b)
            page = self.pages[n]
            page.view.data[b:b + piece] = data[:piece]
            page.view.known[b:b + piece] = b"\1" * piece
            page.dirty = True
            offset, data = offset + piece, data[piece:]

    def flush(self, start: int | None = None, count: int | None = None) -> None:
        """Write back what changed (all pages, or a range)."""
        pages = range(self.spec.pages) if start is None else self.check_range(start, count or 0)
        for n in pages:
            self._write_back(n)

    def relocate(self, src: int, dst: int, count: int, keyed: bool) -> None:
        """Move data on the media; both ranges written back first, dst filled after."""
        sources, targets = self.check_range(src, count), self.check_range(dst, count)
        if src < dst + count and dst < src + count:
            raise Refused(Refusal.RANGE, "source and destination overlap")
        if keyed:
            for n in sources:
                keyid = self.pages[n].keyid
                if keyid in self.locked or (keyid and self.slots[keyid].kind == "tme"):
                    raise Refused(Refusal.NO_KEY, f"KeyID {keyid} has no key")
        for n in [*sources, *targets]:
            self._write_back(n)
        for s, d in zip(sources, targets, strict=True):
            self._move(s, d, keyed)
        for d in targets:
            self._fill(d)

    def _move(self, s: int, d: int, keyed: bool) -> None:
        source, target = self.pages[s], self.pages[d]
        if not keyed:  # raw: the cells as they are; dst keeps its KeyID and tweak
            target.media = source.media.copy()
            return
        target.keyid, target.logical_tweak = source.keyid, source.logical_tweak
        key = self.key_of(source.keyid)
        if key == PLAIN:
            target.media = source.media.copy()
            return
        # decrypt at the source tweak, encrypt at the destination's: the plaintext
        # survives only if the source media really was under that key and tweak
        media = source.media
        readable = media.key == key and media.tweak == self.tweak_of(s)
        target.media = MediaPage(key, self.tweak_of(d),
                                 media.plain.copy() if readable else Contents.unknown())

    def power_cycle(self) -> None:
        """Write back everything, forget keys, every page to KeyID 0, refill."""
        self.flush()
        self.slots = [Slot() for _ in range(self.spec.keyid_count)]
        self.locked.clear()
        if self.spec.tme is Tme.EPHEMERAL:
            self.platform_serial += 1
        for n, page in enumerate(self.pages):
            page.keyid, page.logical_tweak = 0, n
            self._fill(n)

    def restart(self, clean: bool) -> None:
        """A backend restart on the same state directory and view.

        ``clean`` (SIGTERM) writes everything back first; a SIGKILL does not,
        and the media keeps what was written back before.  Either way the view
        file survives (it is re-attached, not refilled), keys are lost, and
        pages mapped with a KeyID that had a key are locked: never written
        back, until the KeyID is programmed again.
        """
        if clean:
            self.flush()
        if self.spec.tme is Tme.EPHEMERAL:
            self.platform_serial += 1
        in_use = {0} | {page.keyid for page in self.pages}  # the unmodelled rest is KeyID 0
        self.locked = set()
        for keyid, slot in enumerate(self.slots):
            if slot.kind == "no_encrypt":
                continue
            if keyid not in in_use:
                self.slots[keyid] = Slot()
            elif slot.kind != "tme" or self.spec.tme is Tme.EPHEMERAL:
                self.locked.add(keyid)

    def set_base(self, base: int) -> None:
        """The NVDIMM moved in the physical map: write back, then refill at the new
        base (under ``spa`` the old ciphertext no longer decrypts; under the others it does)."""
        if base == self.base:
            return
        self.flush()
        self.base = base
        for n in range(self.spec.pages):
            self._fill(n)

    # -- what the tests compare --------------------------------------------------------

    def durable_key(self, n: int) -> Key:
        return self.pages[n].media.key
