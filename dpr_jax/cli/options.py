"""Options that several commands share, spelled once: one flag vocabulary across commands."""

from __future__ import annotations

import argparse
import math

from dpr_jax.cli.errors import Parser


def _bounds(lo, hi, lo_open: bool, hi_open: bool) -> str:
    """`` >= 1``, `` > 0 and <= 1``, or ``""``: the range in :func:`number`'s messages."""
    bounds = []
    if lo is not None:
        bounds.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        bounds.append(f"{'<' if hi_open else '<='} {hi}")
    return " " + " and ".join(bounds) if bounds else ""


def number(kind: type = int, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False):  # fmt: skip
    """An argparse ``type=``: a finite ``kind`` (int or float) in the range ``[lo, hi]`` (``(lo``
    / ``hi)`` when open). A bad value is one line naming the option, exit 2 (``argument --k:
    expected an integer >= 1, got '0'``); NaN and infinities are refused."""
    want = f"{'an integer' if kind is int else 'a number'}{_bounds(lo, hi, lo_open, hi_open)}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def number_list(kind: type = int, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False, example: str = "10,100"):  # fmt: skip
    """An argparse ``type=``: a comma list of :func:`number` values (``--ks 10,100``,
    ``--targets 0.90,0.95``), parsed and checked where the options are read: a bad or empty list
    is one line naming the option and the whole list, exit 2, before any work."""
    one = number(kind, lo, hi, lo_open, hi_open)
    noun = "integers" if kind is int else "numbers"
    want = f"a comma list of {noun}{_bounds(lo, hi, lo_open, hi_open)}, e.g. {example}"

    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            if parts:
                return [one(p) for p in parts]
        except argparse.ArgumentTypeError:
            pass
        raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")

    parse.__name__ = f"{kind.__name__} list"
    return parse


def name_list(names, empty: bool = False, example: str = ""):
    """An argparse ``type=``: a comma list of names out of ``names`` (``--skip hnsw,scann``): an
    unknown one (a typo that would otherwise be ignored) is one line, exit 2. ``empty`` allows
    ``""`` (nothing chosen)."""
    names = tuple(names)

    def parse(text: str) -> list[str]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        unknown = [p for p in parts if p not in names]
        if unknown or not (parts or empty):
            got = ",".join(unknown) if unknown else repr(text)
            raise argparse.ArgumentTypeError(
                f"{got}: not one of {','.join(names)}" + (f" (e.g. {example})" if example else "")
            )
        return list(dict.fromkeys(parts))

    parse.__name__ = "name list"
    return parse


POSITIVE = number(int, 1)  # counts and sizes: --k, --batch-size, --max-length, --limit ...
NON_NEGATIVE = number(int, 0)  # seeds, --skip, counts where 0 means none
FRACTION = number(float, 0.0, 1.0, hi_open=True)  # [0, 1): --val-fraction
parse_ks = number_list(int, 1, example="1,5,20")  # cut-offs: --ks 1,5,20 (every command)


def refuse_together(parser: argparse.ArgumentParser, args: argparse.Namespace,
                    *pairs: tuple[str, str]) -> None:  # fmt: skip
    """Refuse options given together that exclude each other (one line, exit 2): each pair is
    ``(dest_a, dest_b)``; an option counts as given when it is not None (nor False)."""
    for a, b in pairs:
        if getattr(args, a) not in (None, False) and getattr(args, b) not in (None, False):
            parser.error(f"{_flag(a)} and {_flag(b)} exclude each other: give one of them")


def _flag(dest: str) -> str:
    return dest if dest.startswith("<") else "--" + dest.replace("_", "-")


def add_quiet(parser: argparse.ArgumentParser) -> None:
    """``--quiet`` (alias ``--no-progress``): no progress bars or phase lines on stderr; results
    and the closing summary are still printed."""
    parser.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                        help="no progress output on stderr")  # fmt: skip


def training_parser(prog: str, description: str) -> Parser:
    """The options of every training command: --config, --workdir, --set, --print-config and the
    multi-host group (see :func:`start_distributed`)."""
    p = Parser(prog=prog, description=description)
    p.add_argument("--config", required=True, help="a Python config file with get_config()")
    p.add_argument(
        "--workdir", required=True, help="checkpoints, metrics, config and model go here"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set num_steps=100")  # fmt: skip
    g = p.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--coordinator", help="host:port of process 0")
    g.add_argument("--num-processes", type=POSITIVE)
    g.add_argument("--process-id", type=NON_NEGATIVE)
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    return p


def start_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed`` from the multi-host options, when given. (Imported here: this
    module imports no jax, so that scripts can parse with its types before they set XLA's
    flags.)"""
    if args.coordinator or args.num_processes:
        from dpr_jax.parallel import initialize_distributed

        initialize_distributed(args.coordinator, args.num_processes, args.process_id)


# --dtype of the commands that read with a reader (read, ask)
READER_DTYPES = ("float32", "bfloat16")
READER_DTYPE_HELP = (
    "the reader's compute dtype (parameters stay float32); bfloat16 on a CPU reads mixed: float32 "
    "activations, bfloat16 products accumulated in float32 (faster where the CPU has avx512_bf16; "
    "README: 'reading in bfloat16 on a CPU')"
)
