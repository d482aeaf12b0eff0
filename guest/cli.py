"""``mktme-guest``: the in-guest command line (issue 5; runs inside the VM as root).

Physical addresses here are guest physical addresses (what the guest sees in
/proc/iomem, pagemap, sysfs); the backend's data-area offsets are derived
with the NVDIMM base from GET_CONFIG.  Only :func:`main` turns an exception
into a one-line message on stderr and an exit status.
"""

from __future__ import annotations

import argparse
import os
import sys

from mktme_emu.usage import OneLineParser, read_secret
from mktme_emu.vocabulary import PAGE_SIZE

# Each command imports what it alone needs (json, physaddr, dax with ctypes and
# logging, the key-program struct, the scenario phases): under TCG every module
# costs the guest tens of milliseconds, and `status` must stay cheap
# (tests/test_guest_imports.py pins what it may load).
from . import channel, system
from .argtypes import integer, size
from .errors import KeyRefused, MktmeError, UsageError

TYPE_CHECKING = False  # not typing's (see mktme_emu.protocol)
if TYPE_CHECKING:
    from collections.abc import Sequence

    from mktme_emu.protocol import Client, KeyProgram, KeyStatus

    from .physaddr import Extent

EXIT_ERROR = 1


def _connect(args: argparse.Namespace) -> Client:
    return channel.connect(args.channel, args.timeout)


def _print_extents(extents: list[Extent], base: int | None, as_json: bool, **extra: object) -> None:
    """Extents as a table (PA, data-area offset when known, length) or as JSON."""
    import json

    rows = [{**e.as_dict(), **({"offset": e.pa - base} if base is not None else {})} for e in extents]
    if as_json:
        print(json.dumps({**extra, "extents": rows}, indent=2))
        return
    print(f"{'pa':>14} {'offset':>12} {'length':>10} {'logical':>10}")
    for r in rows:
        offset = f"{r['offset']:#x}" if "offset" in r else "-"
        print(f"{r['pa']:#14x} {offset:>12} {r['length']:#10x} {r['logical']:#10x}")


# -- status ------------------------------------------------------------------------------------

def _status(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        info: dict[str, object] = {**client.features().as_dict(), **client.config().as_dict()}
    info.pop("view", None)  # the guest role never learns the host's view path
    info["devices"] = system.nvdimm_devices()
    if args.json:
        import json

        print(json.dumps(info, indent=2))
        return 0
    for name, value in info.items():
        shown = hex(value) if name in ("base", "size") and isinstance(value, int) else value
        print(f"{name:16} {shown}")
    return 0


# -- key / namespace-key ---------------------------------------------------------------------------

def _add_key_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--keyid", required=True, type=integer)
    what = cmd.add_mutually_exclusive_group(required=True)
    what.add_argument("--user", metavar="KEYHEX:TWEAKHEX", help="SET_KEY_DIRECT with these keys "
                      "(visible in the process list: prefer --user-file)")
    what.add_argument("--user-file", metavar="FILE", help="KEYHEX:TWEAKHEX read from FILE (- = stdin)")
    what.add_argument("--random", action="store_true", help="SET_KEY_RANDOM (the key never leaves)")
    what.add_argument("--clear", action="store_true", help="CLEAR_KEY: back to TME behaviour")
    what.add_argument("--no-encrypt", action="store_true", help="NO_ENCRYPT: the media as it is")
    what.add_argument("--options", help='Linux key-service form: "type=user algorithm=aes-xts-128 '
                      'key=HEX tweak=HEX" (type: user, cpu, clear, no-encrypt)')
    what.add_argument("--options-file", metavar="FILE", help="the --options text read from FILE "
                      "(- = stdin)")
    cmd.add_argument("--alg", default="aes-xts-128", choices=["aes-xts-128", "aes-xts-256"])


def _key_program(args: argparse.Namespace) -> KeyProgram:
    """The struct the options describe (reading a key file if one is named)."""
    from mktme_emu.protocol import key_program_from_choice

    user = read_secret(args.user_file, "--user-file") if args.user_file else args.user
    options = (read_secret(args.options_file, "--options-file") if args.options_file
               else args.options)
    return key_program_from_choice(args.keyid, args.alg, user=user, random=args.random,
                                   clear=args.clear, options=options)


def _refused(client: Client, program: KeyProgram, status: KeyStatus) -> KeyRefused:
    """KeyRefused whose message says why, with the device's KeyID range."""
    keyid_count = 1 << client.config().keyid_bits
    return KeyRefused(program.keyid, status, status.explain(program, keyid_count))


def _key(args: argparse.Namespace) -> int:
    """Print the status (scripts read it); KeyRefused (exit 1) unless PROG_SUCCESS."""
    from mktme_emu.protocol import KeyStatus

    program = _key_program(args)
    with _connect(args) as client:
        status = client.program_key(program)
        refused = None if status is KeyStatus.PROG_SUCCESS else _refused(client, program, status)
    print(status.name)
    if refused is not None:
        raise refused
    return 0


def _namespace_key(args: argparse.Namespace) -> int:
    from mktme_emu.protocol import KeyStatus

    from . import dax
    device = args.device or system.default_device()
    program = _key_program(args)
    with _connect(args) as client:
        status = client.program_key(program)
        if status is not KeyStatus.PROG_SUCCESS:
            raise _refused(client, program, status)
        extents = dax.map_namespace(device, args.keyid, client=client)
        base = dax.DataArea.of(client).base
    system.drop_caches(device)
    _print_extents(extents, base, args.json, device=device, keyid=args.keyid)
    return 0


# -- map / flush / relocate / inspect ------------------------------------------------------------

def _add_where(cmd: argparse.ArgumentParser, verb: str, required: bool) -> None:
    """--pa A --length L | --file PATH | --device /dev/daxX.Y --offset O --length L."""
    where = cmd.add_mutually_exclusive_group(required=required)
    where.add_argument("--pa", type=size, help=f"{verb} the guest physical range PA..PA+LENGTH")
    where.add_argument("--file", help=f"{verb} every block of a file on a DAX filesystem (FIEMAP)")
    where.add_argument("--device", help=f"{verb} OFFSET..OFFSET+LENGTH of a devdax device")
    cmd.add_argument("--offset", type=size, default=0, help="byte offset in --device or --file")
    cmd.add_argument("--length", type=size, help="bytes (whole 4 KiB pages for map; "
                     "default for --file: to its end)")


def _where(args: argparse.Namespace) -> list[Extent]:
    """The physical extents the --pa/--file/--device options name (round_tail for files)."""
    from . import dax, physaddr
    if args.file is not None:
        found = physaddr.file_extents(args.file, start=args.offset, length=args.length)
        return dax.page_extents(found, round_tail=True, hint=dax.FILE_HINT)
    if args.length is None:
        raise UsageError("--length is required with --pa and --device")
    if args.device is not None:
        return physaddr.dax_extents(args.device, args.offset, args.length)
    return [physaddr.Extent(args.pa, args.length)]


def _map(args: argparse.Namespace) -> int:
    from . import dax
    extents = _where(args)
    with _connect(args) as client:
        dax.map_extents(client, extents, args.keyid, args.logical_tweak)
        base = dax.DataArea.of(client).base
    if args.json or args.verbose:
        _print_extents(extents, base, args.json, keyid=args.keyid)
    return 0


def _flush(args: argparse.Namespace) -> int:
    from . import dax
    with _connect(args) as client:
        if args.pa is None and args.file is None and args.device is None:
            flushed = client.flush()
        else:
            flushed = dax.flush_extents(client, _where(args))
    print(flushed)
    return 0


def _relocate(args: argparse.Namespace) -> int:
    from . import dax
    from .physaddr import Extent
    with _connect(args) as client:
        area = dax.DataArea.of(client)
        src = area.offset(Extent(args.src_pa, args.length))
        dst = area.offset(Extent(args.dst_pa, args.length))
        client.relocate(src, dst, args.length, args.mode)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json

    from mktme_emu.protocol import INSPECT_MAX_PAGES

    from . import dax
    from .physaddr import Extent
    with _connect(args) as client:
        area = dax.DataArea.of(client)
        offset = args.offset if args.offset is not None else area.offset(Extent(args.pa, 1))
        start = offset - offset % PAGE_SIZE
        count = max(1, -(-(offset + args.length - start) // PAGE_SIZE))
        records = client.inspect(start, min(count, INSPECT_MAX_PAGES))
    if args.json:
        print(json.dumps([{**r.as_dict(), "pa": area.base + r.offset} for r in records], indent=2))
        return 0
    print(f"{'pa':>14} {'keyid':>5} {'kind':10} {'state':10} {'view[0:16]':32} media[0:16]")
    for r in records:
        state = "locked" if r.locked else ("consistent" if r.consistent else "dirty")
        print(f"{area.base + r.offset:#14x} {r.keyid:5} {r.kind:10} {state:10} "
              f"{r.view_head.hex()} {r.media_head.hex()}")
    return 0


# -- resolve -------------------------------------------------------------------------------------

def _resolve(args: argparse.Namespace) -> int:
    """PA extents of a file (FIEMAP) or devdax range (sysfs), or, with --mmap, by pagemap."""
    from . import dax
    if args.pa is not None:
        raise UsageError("resolve takes --file or --device")
    if args.mmap and args.device is not None:
        if args.length is None:
            raise UsageError("--length is required with --device")
        with dax.mmap_device(args.device, args.offset, args.length, sync=False) as m:
            extents = dax.resolve_range(m.at(args.offset), args.length)
    elif args.mmap:
        length = args.length if args.length is not None else os.stat(args.file).st_size - args.offset
        with dax.mmap_dax(args.file, length, args.offset, sync=False) as m:
            extents = dax.resolve_range(m.mm, length)
    else:
        extents = _where(args)
    base = None
    if args.offsets:
        with _connect(args) as client:
            base = dax.DataArea.of(client).base
    _print_extents(extents, base, args.json, method="pagemap" if args.mmap else
                   ("fiemap" if args.file else "sysfs"))
    return 0


# -- the parser ------------------------------------------------------------------------------------

# Each command's parser is built by its own function, so that a command builds only
# its own (argparse costs a TCG guest ~50 ms to build them all).
Commands = argparse._SubParsersAction  # type: ignore[type-arg]


def _add_status(commands: Commands) -> None:
    cmd = commands.add_parser("status", help="the emulated device, as the guest sees it")
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(func=_status)


def _add_key(commands: Commands) -> None:
    cmd = commands.add_parser("key", help="program a KeyID (PCONFIG MKTME_KEY_PROGRAM)",
                              description="Prints the PCONFIG status; exits 1 unless PROG_SUCCESS. "
                                          "Keys are never echoed.")
    _add_key_options(cmd)
    cmd.set_defaults(func=_key)


def _add_namespace_key(commands: Commands) -> None:
    cmd = commands.add_parser(
        "namespace-key", help="one key per namespace: program a KeyID, map the whole namespace",
        description="Program the key, then map everything the namespace's device exposes "
                    "(/dev/pmemN or /dev/daxX.Y; not its info block or memmap) with the KeyID, "
                    "and drop the block device's cache. Before mkfs/mount.")
    _add_key_options(cmd)
    cmd.add_argument("--device", help="/dev/pmemN or /dev/daxX.Y (default: the only one)")
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(func=_namespace_key)


def _add_relocate(commands: Commands) -> None:
    cmd = commands.add_parser("relocate", help="move data on the media (raw or keyed)")
    cmd.add_argument("--src-pa", required=True, type=size)
    cmd.add_argument("--dst-pa", required=True, type=size)
    cmd.add_argument("--length", required=True, type=size)
    cmd.add_argument("--mode", required=True, choices=("raw", "keyed"))
    cmd.set_defaults(func=_relocate)


def _add_inspect(commands: Commands) -> None:
    cmd = commands.add_parser("inspect", help="pages side by side: KeyID, view, media, consistency")
    where = cmd.add_mutually_exclusive_group(required=True)
    where.add_argument("--pa", type=size, help="guest physical address")
    where.add_argument("--offset", type=size, help="data-area offset")
    cmd.add_argument("--length", type=size, default=PAGE_SIZE)
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(func=_inspect)


def _add_map(commands: Commands) -> None:
    cmd = commands.add_parser("map", help="give whole pages a KeyID (emulated encrypt_mprotect)",
                              description="Map a physical range, a DAX file's blocks, or a devdax "
                                          "range with a KeyID. What they held reads as garbage "
                                          "through the new KeyID: write them afterwards.")
    _add_where(cmd, "map", required=True)
    cmd.add_argument("--keyid", required=True, type=integer)
    cmd.add_argument("--logical-tweak", type=integer, help="page tweak of the first page")
    cmd.add_argument("--json", action="store_true", help="print the mapped extents as JSON")
    cmd.set_defaults(func=_map)


def _add_flush(commands: Commands) -> None:
    cmd = commands.add_parser("flush", help="write back what changed; durable on return",
                              description="Without a range: the whole device.")
    _add_where(cmd, "flush", required=False)
    cmd.set_defaults(func=_flush)


def _add_resolve(commands: Commands) -> None:
    cmd = commands.add_parser("resolve", help="physical extents of a file or a devdax range",
                              description="FIEMAP + sysfs for a file, sysfs for a devdax range; "
                                          "with --mmap, mmap it and read /proc/self/pagemap "
                                          "instead (faults pages in by reading: a hole shows "
                                          "the zero page).")
    _add_where(cmd, "resolve", required=True)
    cmd.add_argument("--mmap", action="store_true", help="resolve through an mmap and pagemap")
    cmd.add_argument("--offsets", action="store_true", help="add data-area offsets (asks the backend)")
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(func=_resolve)


PHASE_HELP = "run one guest-side step of a scenario (SPEC section 6)"


def _add_phase_placeholder(commands: Commands) -> None:
    """``phase`` for the list of commands; chosen, the full parser is built (phases.add_parser)."""
    commands.add_parser("phase", help=PHASE_HELP)


def _add_phases(commands: Commands) -> None:
    from . import phases  # every scenario step: only for `phase`
    phases.add_parser(commands)


#: The commands in the order --help lists them.
COMMANDS = {"status": _add_status, "key": _add_key, "namespace-key": _add_namespace_key,
            "relocate": _add_relocate, "inspect": _add_inspect, "map": _add_map,
            "flush": _add_flush, "resolve": _add_resolve, "phase": _add_phases}
_GLOBAL_FLAGS = ("-v", "--verbose")
_GLOBAL_VALUES = ("--channel", "--timeout")


def command_word(words: Sequence[str]) -> str | None:
    """The command the words name, if nothing but global options comes before it.

    Anything else before it (an abbreviated option, ``--help``, a typo) gives
    None: then the whole parser is built, which knows how to answer that.
    """
    index = 0
    while index < len(words):
        word = words[index]
        if word in _GLOBAL_VALUES:
            index += 2
        elif word in _GLOBAL_FLAGS or word.startswith(tuple(f"{v}=" for v in _GLOBAL_VALUES)):
            index += 1
        else:
            return word if word in COMMANDS else None
    return None


def build_parser(with_phases: bool = True, command: str | None = None) -> argparse.ArgumentParser:
    """The command line: global options, the commands, ``phase NAME``.

    ``command`` (one of :data:`COMMANDS`) builds only that command's parser:
    what running it needs.  Otherwise every command is built;
    ``with_phases=False`` then lists ``phase`` without its sub-parsers (and
    without importing every phase module).
    """
    parser = OneLineParser(
        prog="mktme-guest",
        description="Inside an mktme-emu VM: program MKTME keys, map DAX memory with KeyIDs, "
                    "flush, relocate, inspect, and run the guest phases of the scenarios.")
    parser.add_argument("--channel", help="control port device or unix:SOCKET (default: "
                        f"${channel.ENV_CHANNEL}, else the port {channel.PORT_NAME})")
    parser.add_argument("--timeout", type=float, help="seconds to wait for the backend "
                        f"(default ${channel.ENV_TIMEOUT} or {channel.DEFAULT_TIMEOUT:g})")
    parser.add_argument("-v", "--verbose", action="store_true", help="say more on stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if command in COMMANDS:
        COMMANDS[command](commands)
        return parser
    for name, add in COMMANDS.items():
        (add if name != "phase" or with_phases else _add_phase_placeholder)(commands)
    return parser


def _run_phase(args: argparse.Namespace) -> int:
    from . import phases
    with _connect(args) as client:
        return phases.run(args, client)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the only place an error becomes a message (one line) and a status."""
    words = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(with_phases="phase" in words, command=command_word(words)).parse_args(words)
    if args.verbose:  # only dax logs, at INFO: without -v there is nothing to configure
        import logging

        logging.basicConfig(level=logging.DEBUG, format="mktme-guest: %(message)s",
                            stream=sys.stderr)
    func = _run_phase if args.command == "phase" else args.func
    try:
        return int(func(args))
    except MktmeError as exc:
        print(f"mktme-guest: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        return EXIT_ERROR
    except OSError as exc:
        print(f"mktme-guest: {exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}",
              file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # still one line (the type, never text that may quote input)
        if args.verbose:
            raise
        print(f"mktme-guest: internal error ({type(exc).__name__}); run with -v for the traceback",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
