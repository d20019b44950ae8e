"""The one exception type for bad user input (config, paths, files), and the one check of an output
folder. Command lines turn a UserError into one line on stderr and exit code 2. Imports nothing
from this project."""
import argparse
import errno
import os
import tempfile
from pathlib import Path


class UserError(ValueError):
    """Bad input that the user can fix; the message says what is wrong and how to fix it."""


def check_output_folder(path, what: str) -> None:
    """UserError unless `path` can become (or is) a folder we may write: not a file, not under a
    file, its nearest existing ancestor writable. `what` names it as the user gave it (`--out X`,
    `out=X`). Checked before anything is written."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} is a file; give a folder path")
    parent = p if p.exists() else next((a for a in p.absolute().parents if a.exists()), None)
    if parent is None or not parent.is_dir():
        raise UserError(f"{what} lies under a file ({parent}); give a folder path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what}: {parent} is not writable; choose a folder you may write to")
    if p.exists() and any(p.iterdir()):   # never touch a folder that holds something (it may be the user's):
        return                            # the commands' own checks refuse it, or it is ours and replaced later
    try:   # permissions can say yes where the file system says no (read-only mounts, /proc, /sys)
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=parent))
    except OSError as e:
        raise UserError(f"{what}: cannot create folders in {parent} ({e.strerror or type(e).__name__}); "
                        "choose a folder you may write to") from None


def error_line(e: Exception) -> str:
    """The one `error:` line a command prints for a UserError, or for a file-system fault (a full
    disk, a read-only target, a path under a file) met while it ran: what failed, where, and what to
    do. Everything this project writes goes to a temporary name first, so nothing half-written stays."""
    if not isinstance(e, OSError):
        return f"error: {e}"
    where = f" ({e.filename})" if e.filename else ""
    fix = {errno.ENOSPC: "free disk space and rerun (a labeling run resumes where it stopped)",
           errno.EDQUOT: "free disk space and rerun (a labeling run resumes where it stopped)",
           errno.EROFS: "choose a folder on a writable file system", errno.EACCES: "choose a folder you may write to",
           errno.EPERM: "choose a folder you may write to", errno.ENOTDIR: "a path component is a file; choose another path",
           }.get(e.errno, "check the path and rerun")
    return f"error: {e.strerror or type(e).__name__}{where}; {fix}; nothing half-written was kept"


def doc_summary(doc: str | None) -> str:
    """A command's --help description: the first paragraph of its module docstring, whole (its first
    line alone is cut mid-sentence where the paragraph wraps)."""
    first = (doc or "").strip().split("\n\n", 1)[0]
    return " ".join(line.strip() for line in first.splitlines())


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's bad-input convention: a command-line mistake prints one
    `error:` line naming it and how to get help, and exits with code 2 (argparse's own error
    prints the usage block too)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"error: {self.prog}: {message}; see {self.prog} --help\n")
