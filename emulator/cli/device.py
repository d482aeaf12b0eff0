"""The device commands: serve, status, key, map, flush, relocate, inspect, power-cycle.

``xts`` has a module of its own (:mod:`.xts_command`), light enough to stream
in constant memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .. import protocol as p
from ..controller import ControllerConfig, TweakMode, open_controller
from ..controller.config import DEFAULT_REWRITE_AT
from ..controller.persist import load_metadata
from ..crypto import DEFAULT_UNIT
from ..errors import ConfigError, StateError
from ..hardening import harden_process
from ..keytable import DEFAULT_KEYID_BITS, TmePolicy
from ..service import ServiceConfig, run_backend
from ..usage import read_secret
from . import args as types
from . import daemon, xts_command

log = logging.getLogger("mktme_emu")
ADMIN_SOCKET, GUEST_SOCKET = "control.sock", "guest.sock"
SERVE_LOG = "serve.log"


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    _add_serve(commands)
    _add_status(commands)
    _add_key(commands)
    _add_map(commands)
    _add_flush(commands)
    _add_relocate(commands)
    _add_inspect(commands)
    cmd = commands.add_parser("power-cycle", help="write back, forget keys, reset KeyIDs, refill")
    _socket_arg(cmd)
    cmd.set_defaults(func=_power_cycle)
    xts_command.add_command(commands)


def _socket_arg(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--socket", "-s", required=True, type=Path,
                     help="the backend's control socket (STATE_DIR/control.sock)")


def _connect(args: argparse.Namespace) -> p.Client:
    return p.Client.connect(args.socket)


# -- serve -------------------------------------------------------------------------

def _add_serve(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cmd = commands.add_parser(
        "serve", help="run the backend for one NVDIMM (foreground, or --daemon)",
        description="Own an emulated MKTME NVDIMM: keep the media in STATE_DIR, serve the view "
                    "QEMU maps, answer the control socket. Runs until SIGTERM/SIGINT, then writes "
                    "everything back and exits 0. Options left out on an existing STATE_DIR are "
                    "taken from it. With --daemon it returns once the sockets listen, printing "
                    "the backend's pid (its log goes to STATE_DIR/serve.log); the control "
                    "socket disappears once a stopped backend has written everything back.")
    cmd.add_argument("--state-dir", required=True, type=Path, help="media, metadata, sockets")
    cmd.add_argument("--size", type=types.size, help="data area size (default 256M; 2M multiple)")
    cmd.add_argument("--base", type=types.address, help="guest physical base of the NVDIMM")
    cmd.add_argument("--keyid-bits", type=int, help=f"KeyID bits (default {DEFAULT_KEYID_BITS})")
    cmd.add_argument("--tme", choices=[t.value for t in TmePolicy], help="KeyID 0 policy (bypass)")
    cmd.add_argument("--tweak", choices=[t.value for t in TweakMode], help="tweak mode (spa)")
    cmd.add_argument("--unit", type=types.size, help=f"XTS data unit in bytes ({DEFAULT_UNIT})")
    cmd.add_argument("--label-size", type=types.size, help="NVDIMM label area (0 = none)")
    cmd.add_argument("--socket", type=Path, help="control socket (STATE_DIR/control.sock)")
    cmd.add_argument("--guest-socket", type=Path,
                     help="socket QEMU's guest channel connects to (STATE_DIR/guest.sock)")
    cmd.add_argument("--view", type=Path, help="view file (a per-state-dir file in /dev/shm)")
    cmd.add_argument("--daemon", action="store_true",
                     help="return once ready, printing the pid (default: stay in the foreground)")
    cmd.add_argument("--rewrite-at", type=_rewrite_at, default=DEFAULT_REWRITE_AT, metavar="FRACTION",
                     help="a write-back whose changes reach this fraction of the media's data "
                          "rewrites the media file (each byte written once, needs that much free "
                          f"space) instead of journaling (each changed page twice); default "
                          f"{DEFAULT_REWRITE_AT}, 0 = whenever anything changed, never = always journal")
    cmd.set_defaults(func=_serve)


def _rewrite_at(text: str) -> float | None:
    if text == "never":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError("expected a fraction >= 0 or 'never'")
    return value


def serve_config(args: argparse.Namespace) -> ControllerConfig:
    """Options, else what the state directory holds, else the defaults."""
    stored = load_metadata(args.state_dir) if args.state_dir.exists() else None
    kept: dict[str, object] = dict(stored.config) if stored else {}

    def pick(name: str, default: object) -> object:
        value = getattr(args, name)
        return value if value is not None else kept.get(name, default)

    view = args.view or (Path(str(kept["view"])) if "view" in kept else None)
    return ControllerConfig(
        state_dir=args.state_dir, size=int(pick("size", 256 << 20)),  # type: ignore[call-overload]
        label_size=int(pick("label_size", 0)), base=args.base,  # type: ignore[call-overload]
        unit=int(pick("unit", DEFAULT_UNIT)), tweak=TweakMode(pick("tweak", "spa")),  # type: ignore[call-overload]
        keyid_bits=int(pick("keyid_bits", DEFAULT_KEYID_BITS)),  # type: ignore[call-overload]
        tme=TmePolicy(pick("tme", "bypass")), view_path=view, rewrite_at=args.rewrite_at)


def _serve(args: argparse.Namespace) -> int:
    harden_process()
    detached = daemon.detach(args.state_dir / SERVE_LOG) if args.daemon else None
    if isinstance(detached, int):  # the parent: the daemon is ready, or failed
        return detached
    config = serve_config(args)
    controller = open_controller(config)  # one-line StateError: locked, damaged, disk full
    service = ServiceConfig(admin_socket=args.socket or config.state_dir / ADMIN_SOCKET,
                            guest_socket=args.guest_socket or config.state_dir / GUEST_SOCKET)

    def ready() -> None:
        log.info("serving %s NVDIMM at base %#x: view %s, control %s, guest %s",
                 _human(config.size), controller.base, config.view, service.admin_socket,
                 service.guest_socket)
        if detached is not None:
            detached.ready()

    try:
        run_backend(controller, service, ready)
    except OSError as exc:  # the write-back at exit failed: never report success
        raise StateError(f"writing back at exit failed: {exc.strerror or exc}"
                         f"{f' ({exc.filename})' if exc.filename else ''}; the media holds "
                         "what the last successful flush made durable") from exc
    log.info("written back; exiting")
    return 0


def _human(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


# -- status / key / map / flush / relocate -------------------------------------------

def _add_status(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cmd = commands.add_parser("status", help="device configuration and counters")
    _socket_arg(cmd)
    cmd.add_argument("--json", action="store_true", help="machine-readable output")
    cmd.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        info = {**client.config().as_dict(), **client.stats().as_dict()}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for name, value in info.items():
        shown = hex(value) if name == "base" and isinstance(value, int) else value
        print(f"{name:20} {shown}")
    return 0


def _add_key(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cmd = commands.add_parser(
        "key", help="program a KeyID (PCONFIG MKTME_KEY_PROGRAM)",
        description="Program, randomise, clear or un-encrypt a KeyID. Prints the PCONFIG status; "
                    "exits 1 unless it is PROG_SUCCESS. Keys are never echoed or logged.")
    _socket_arg(cmd)
    cmd.add_argument("--keyid", required=True, type=types.integer)
    what = cmd.add_mutually_exclusive_group(required=True)
    what.add_argument("--user", metavar="KEYHEX:TWEAKHEX", help="SET_KEY_DIRECT with these keys "
                      "(visible to other users in the process list: prefer --user-file)")
    what.add_argument("--user-file", metavar="FILE", help="KEYHEX:TWEAKHEX read from FILE (- = stdin)")
    what.add_argument("--random", action="store_true", help="SET_KEY_RANDOM (key never leaves)")
    what.add_argument("--clear", action="store_true", help="CLEAR_KEY: back to TME behaviour")
    what.add_argument("--no-encrypt", action="store_true", help="NO_ENCRYPT: media as it is")
    what.add_argument("--options", help='"type=user algorithm=aes-xts-128 key=HEX tweak=HEX"')
    what.add_argument("--options-file", metavar="FILE", help="the --options text read from FILE "
                      "(- = stdin)")
    cmd.add_argument("--alg", default="aes-xts-128", choices=["aes-xts-128", "aes-xts-256"])
    cmd.set_defaults(func=_key)


def key_program_from_args(args: argparse.Namespace) -> p.KeyProgram:
    """The struct the key command's options describe (reading a key file if one is named)."""
    user = read_secret(args.user_file, "--user-file") if args.user_file else args.user
    options = (read_secret(args.options_file, "--options-file") if args.options_file
               else args.options)
    return p.key_program_from_choice(args.keyid, args.alg, user=user, random=args.random,
                                     clear=args.clear, options=options)


def _key(args: argparse.Namespace) -> int:
    """Print the status; a refusal also says why on stderr and exits 1."""
    harden_process()
    program = key_program_from_args(args)
    keyid_count: int | None = None
    with _connect(args) as client:
        status = client.program_key(program)
        if status is not p.KeyStatus.PROG_SUCCESS:
            keyid_count = 1 << client.config().keyid_bits
    print(status.name)
    if status is p.KeyStatus.PROG_SUCCESS:
        return 0
    print(f"mktme-emu: {status.explain(program, keyid_count)}", file=sys.stderr)
    return 1


def _add_map(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cmd = commands.add_parser("map", help="give whole pages a KeyID (emulated encrypt_mprotect)")
    _socket_arg(cmd)
    cmd.add_argument("--offset", required=True, type=types.address, help="data-area offset")
    cmd.add_argument("--length", required=True, type=types.size)
    cmd.add_argument("--keyid", required=True, type=types.integer)
    cmd.add_argument("--logical-tweak", type=types.integer, help="page tweak of the first page")
    cmd.set_defaults(func=_map)


def _map(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        client.map(args.offset, args.length, args.keyid, args.logical_tweak)
    return 0


def _add_flush(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cmd = commands.add_parser("flush", help="write back what changed; durable on return")
    _socket_arg(cmd)
    cmd.add_argument("--offset", type=types.address, default=0)
    cmd.add_argument("--length", type=types.size, default=0, help="0 = the whole device")
    cmd.set_defaults(func=_flush)


def _flush(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        flushed = client.flush(args.offset, args.length)
    print(flushed)
    return 0


def _add_relocate(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cmd = commands.add_parser("relocate", help="move data on the media (raw or keyed)")
    _socket_arg(cmd)
    cmd.add_argument("--src", required=True, type=types.address)
    cmd.add_argument("--dst", required=True, type=types.address)
    cmd.add_argument("--length", required=True, type=types.size)
    cmd.add_argument("--mode", required=True, choices=p.RELOCATE_MODES)
    cmd.set_defaults(func=_relocate)


def _relocate(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        client.relocate(args.src, args.dst, args.length, args.mode)
    return 0


def _power_cycle(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        client.power_cycle()
    return 0


# -- inspect -----------------------------------------------------------------------------

def _add_inspect(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cmd = commands.add_parser("inspect", help="pages side by side: KeyID, view, media, consistency")
    _socket_arg(cmd)
    where = cmd.add_mutually_exclusive_group(required=True)
    where.add_argument("--offset", type=types.address, help="data-area offset")
    where.add_argument("--pa", type=types.address, help="guest physical address")
    cmd.add_argument("--length", type=types.size, default=4096)
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(func=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        offset = args.offset
        if args.pa is not None:
            base = client.config().base
            offset = args.pa - base
            if offset < 0:
                raise ConfigError(f"physical address {args.pa:#x} is below the NVDIMM base {base:#x}")
        start = offset - offset % 4096
        count = max(1, -(-(offset + args.length - start) // 4096))
        records = client.inspect(start, min(count, p.INSPECT_MAX_PAGES))
    if args.json:
        print(json.dumps([r.as_dict() for r in records], indent=2))
        return 0
    print(f"{'offset':>12} {'keyid':>5} {'kind':10} {'state':10} {'view[0:16]':32} media[0:16]")
    for r in records:
        state = "locked" if r.locked else ("consistent" if r.consistent else "dirty")
        print(f"{r.offset:#12x} {r.keyid:5} {r.kind:10} {state:10} {r.view_head.hex()} {r.media_head.hex()}")
    return 0
