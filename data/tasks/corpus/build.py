"""Rebuild `stdlib.json.gz`, the natural-text corpus of the `nat_*` tasks, from a Python install.

The corpus is a fixed snapshot, committed, so that a request's text is the same on every machine
(the GPU machine runs another Python). It holds the sources of pure-Python standard-library
modules (PSF License, redistributable with its notice) as written by their authors: code,
comments and English docstrings. Nothing here runs when labeling; only this rebuild reads the
install.

  python data/tasks/corpus/build.py            # writes data/tasks/corpus/stdlib.json.gz
"""
from __future__ import annotations

import ast
import gzip
import json
import os
import platform
import sys
import sysconfig
from pathlib import Path

MODULES = """abc argparse ast base64 bisect calendar cmd codecs colorsys configparser contextlib copy csv
dataclasses datetime difflib dis enum filecmp fileinput fnmatch fractions ftplib functools getopt gettext
glob gzip heapq hmac imaplib inspect ipaddress locale mailbox netrc numbers operator optparse pathlib pickle
plistlib poplib pprint queue quopri random reprlib sched secrets selectors shlex shutil smtplib socketserver
statistics string subprocess tarfile tempfile textwrap threading tokenize traceback typing uuid warnings
wave weakref zipapp email/utils email/message json/__init__ json/encoder json/decoder logging/__init__
logging/handlers http/client http/cookies urllib/parse urllib/request xml/dom/minidom html/parser
concurrent/futures/_base importlib/metadata/__init__ unittest/case collections/__init__""".split()
MAX_LINES = 1500   # a module's first lines: enough for 64K-token requests from a few files


def _cut(text: str) -> int:
    """Lines to keep: up to the end of the last top-level statement within MAX_LINES (so it parses)."""
    ends = [node.end_lineno for node in ast.parse(text).body if node.end_lineno <= MAX_LINES]
    return max(ends, default=0)


def build(out: Path) -> dict:
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for name in MODULES:
        text = (lib / f"{name}.py").read_text(encoding="utf-8")
        files.append({"name": f"{name}.py", "text": "".join(text.splitlines(keepends=True)[:_cut(text)])})
    corpus = {"source": f"the Python {platform.python_version()} standard library ({lib})",
              "license": "PSF License Agreement for Python (https://docs.python.org/3/license.html)",
              "max_lines": MAX_LINES, "files": files}
    tmp = out.with_name(f".{out.name}.tmp")
    with gzip.GzipFile(tmp, "wb", mtime=0) as f:   # mtime 0: the same bytes on every rebuild
        f.write(json.dumps(corpus, ensure_ascii=False, sort_keys=True).encode())
    os.replace(tmp, out)
    return corpus


if __name__ == "__main__":
    corpus = build(Path(__file__).with_name("stdlib.json.gz"))
    print(f"{len(corpus['files'])} files, {sum(len(f['text']) for f in corpus['files']) / 1e6:.1f} M characters",
          file=sys.stderr)
