"""The command line: flags from a config dataclass (the one helper of train.py and sample.py), and output
that survives its reader (every command's first call).

Machinery, not the paper: one flag per field of a config dataclass (`TrainConfig`, `SampleConfig`),
`--field-name`, whose help text is the field's end-of-line comment in the source (the one place each setting
is described) followed by its default; bools as --x / --no-x, tuples as one or more values, choices, and
typed, ranged numbers whose bad values are argparse's one-line errors (exit status 2).
"""
import argparse
import errno
import math
import os
import re
import sys
from dataclasses import fields
from typing import Optional


def comments(cls, source):
    """{field: help}: the end-of-line comment of each field of dataclass `cls`, read from its file `source`
    (the text, not inspect.getsource: works under `python -m cProfile` too)."""
    with open(source) as f:
        src = f.read()
    src = src[src.index(f"class {cls.__name__}"):]
    return {m.group(1): m.group(2).strip() for m in
            re.finditer(r"^\s+(\w+):[^#\n]*#(.*)$", src[:src.index("\n\n\n")], re.MULTILINE)}


def add_flags(parser, cls, source, defaults, choices=None, types=None):
    """One flag per field of dataclass `cls` (defined in file `source`), default `defaults[name]`, help its
    comment and " (default: ...)" ("none" for "", left out for None); type `types[name]`, else the annotation
    (Optional[float]: float, tuple: one or more str); `choices[name]` restricts the values. -> parser."""
    helps = comments(cls, source)
    for f in fields(cls):
        flag, default = "--" + f.name.replace("_", "-"), defaults[f.name]
        shown = "" if default is None else f" (default: {default if default != '' else 'none'})"
        text = (helps.get(f.name, "") + shown).replace("%", "%%")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            typ = (types or {}).get(f.name, float if f.type == Optional[float] else str if f.type is tuple else f.type)
            parser.add_argument(flag, type=typ, default=default, nargs="+" if f.type is tuple else None,
                                choices=(choices or {}).get(f.name), help=text)
    return parser


def number(kind, low=None, high=None):
    """A flag type: int or float `kind`, finite, in [low, high] (either bound optional)."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}" if low is not None else "finite"
            raise argparse.ArgumentTypeError(f"{text} must be {bounds}")
        return v
    return parse


def finite_or_none(text):
    """A flag type: a finite number, or "none" for None (an Optional[float] setting a preset turns on)."""
    return None if text.strip().lower() == "none" else number(float)(text)


def numbers(text):
    """A flag type: comma-separated finite numbers, "0,0.5" -> [0.0, 0.5]."""
    return [number(float)(v) for v in text.split(",") if v]


def device(text):
    """A flag type: "", cpu, cuda or cuda:N."""
    if not re.fullmatch(r"|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


class LostReaderStream:
    """sys.stdout / sys.stderr of a CLI whose reader may go away (`| head`, a killed `| tee`, a closed
    terminal: EPIPE or EIO on write). The first failed write or flush points the file descriptor at os.devnull
    (the Python docs' SIGPIPE recipe), so it and every later write succeed silently: prints, progress bars,
    C code writing to the descriptor and Python's flush at exit (no "Exception ignored ... BrokenPipeError",
    the normal exit status) while the work goes on and checkpoints are still written."""

    def __init__(self, stream):
        self.stream = stream

    def __getattr__(self, name):                        # fileno, isatty, encoding, ... of the real stream
        return getattr(self.stream, name)

    def write(self, text):
        return self._survive(self.stream.write, text) or len(text)

    def flush(self):
        self._survive(self.stream.flush)

    def _survive(self, call, *args):
        try:
            return call(*args)
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.EIO):
                raise
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)
            return None


def survive_lost_output():
    """Every CLI calls this first: stdout and stderr become LostReaderStreams (progress bars, made later, write
    through them too), so no command dies or loses work because its output went away."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, LostReaderStream):
            setattr(sys, name, LostReaderStream(stream))
