"""A text corpus every Python installation already has: the docstrings of the standard library.

Nothing is downloaded. The docstrings of a fixed list of standard-library modules (and
of the public classes, functions and methods they define) are collected with
`inspect`, in a fixed order, cleaned with `inspect.cleandoc` and deduplicated. The
text depends on the Python version (3.11 here: 2,501 documents, about 734,000
characters, 0.73 MB); modules that cannot be imported on this machine are skipped and
reported. Under `python -OO` docstrings are stripped and the corpus is empty, which
`load_corpus` reports as an error.

    python examples/corpus.py            # statistics and a sample
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field

STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "asyncio.events", "asyncio.futures", "asyncio.locks",
    "asyncio.queues", "asyncio.streams", "asyncio.tasks", "base64", "bisect", "bz2",
    "calendar", "cmd", "codecs", "collections", "colorsys", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis",
    "doctest", "email.message", "email.utils", "enum", "fileinput", "fnmatch", "fractions",
    "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html", "html.parser", "http.client", "http.cookies", "http.server", "imaplib", "inspect",
    "io", "ipaddress", "itertools", "json", "json.decoder", "json.encoder", "locale",
    "logging", "logging.handlers", "lzma", "mailbox", "math", "mimetypes", "multiprocessing.pool",
    "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil",
    "platform", "poplib", "pprint", "profile", "pstats", "queue", "quopri", "random", "re",
    "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib",
    "socket", "socketserver", "sqlite3", "statistics", "string", "struct", "subprocess",
    "symtable", "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest.case",
    "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zipimport", "zoneinfo",
)


def _own_members(module: object, name: str) -> list[object]:
    """Public classes and functions defined in `module` (not re-exported), then the
    methods those classes define themselves, in name order."""
    out: list[object] = []
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        out.append(obj)
        if inspect.isclass(obj):
            for m_name, member in sorted(vars(obj).items()):
                if m_name.startswith("_") and m_name != "__init__":
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if isinstance(member, property):
                    member = member.fget
                if inspect.isfunction(member) or inspect.ismethoddescriptor(member):
                    out.append(member)
    return out


def docstrings(modules: tuple[str, ...] = STDLIB_MODULES) -> tuple[list[str], list[str]]:
    """(documents, skipped modules): each document one cleaned, deduplicated docstring,
    in module order, the module's own docstring first."""
    docs: list[str] = []
    seen: set[str] = set()
    skipped: list[str] = []
    for name in modules:
        with warnings.catch_warnings():         # deprecated modules warn on import or access
            warnings.simplefilter("ignore")
            try:
                module = importlib.import_module(name)
            except Exception:             # e.g. sqlite3 built without its C library
                skipped.append(name)
                continue
            members = [module] + _own_members(module, name)
            raws = [getattr(obj, "__doc__", None) for obj in members]
        for raw in raws:
            if not isinstance(raw, str):
                continue
            text = inspect.cleandoc(raw).strip()
            if len(text) < 40 or text in seen:        # one-liners like "Return self." add nothing
                continue
            seen.add(text)
            docs.append(text)
    return docs, skipped


@dataclass
class Corpus:
    """Documents split into train and validation by a hash of their text (stable when
    modules are added or removed)."""

    train: list[str]
    val: list[str]
    skipped: list[str] = field(default_factory=list)

    @property
    def chars(self) -> int:
        return sum(map(len, self.train)) + sum(map(len, self.val))


def load_corpus(val_fraction: float = 0.05, max_docs: int | None = None,
                modules: tuple[str, ...] = STDLIB_MODULES) -> Corpus:
    """The docstring corpus, split train/val; `max_docs` keeps the first documents (smoke
    tests). Raises RuntimeError when no docstrings are available (python -OO)."""
    docs, skipped = docstrings(modules)
    if max_docs is not None:
        docs = docs[:max_docs]
    if not docs:
        raise RuntimeError("no standard-library docstrings found: is Python running with -OO?")
    cut = int(val_fraction * 10_000)
    train, val = [], []
    for d in docs:
        (val if zlib.crc32(d.encode()) % 10_000 < cut else train).append(d)
    return Corpus(train, val, skipped)


MIN_CHARS = 2_000


def load_text_file(path: str, val_fraction: float = 0.1) -> Corpus:
    """A user's UTF-8 text file as a corpus: the last `val_fraction` of it (cut at a line
    break) is the validation text, and each part is split into documents at blank lines.
    Raises ValueError naming the file when it is missing, not UTF-8, or too small to
    train on (fewer than MIN_CHARS characters)."""
    if not os.path.isfile(path):
        raise ValueError(f"--data {path!r}: no such file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"--data {path!r}: not UTF-8 text (byte {e.start}, line {line}: "
                         f"{raw[e.start:e.start + 1]!r}); convert it first, e.g. with "
                         f"iconv -t UTF-8") from None
    text = text.replace("\r\n", "\n")
    n = len(text.strip())
    if n < MIN_CHARS:
        raise ValueError(f"--data {path!r}: {'empty' if n == 0 else f'only {n:,} characters'}; "
                         f"training needs at least {MIN_CHARS:,} characters of text")
    cut = text.find("\n", int(len(text) * (1 - val_fraction)))
    cut = int(len(text) * (1 - val_fraction)) if cut < 0 else cut
    return Corpus(_paragraphs(text[:cut]), _paragraphs(text[cut:]))


def _paragraphs(text: str) -> list[str]:
    """Documents separated by blank lines (a file without any is one document)."""
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def main(argv: list[str] | None = None) -> Corpus:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=int, default=2, help="documents to print")
    args = ap.parse_args(argv)
    c = load_corpus()
    print(f"{len(c.train)} train + {len(c.val)} validation documents, {c.chars:,} characters"
          + (f"; skipped (not importable): {', '.join(c.skipped)}" if c.skipped else ""))
    for d in c.train[:args.sample]:
        print("-" * 60)
        print(d[:600])
    return c


if __name__ == "__main__":
    main()
