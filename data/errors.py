"""The one exception type for bad user input (config, paths, files), and the one check of an output
folder. Command lines turn a UserError into one line on stderr and exit code 2. Imports nothing
from this project."""
import argparse
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
    try:   # permissions can say yes where the file system says no (read-only mounts, /proc, /sys)
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=parent))
    except OSError as e:
        raise UserError(f"{what}: cannot create folders in {parent} ({e.strerror or type(e).__name__}); "
                        "choose a folder you may write to") from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's bad-input convention: a command-line mistake prints one
    `error:` line naming it and how to get help, and exits with code 2 (argparse's own error
    prints the usage block too)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"error: {self.prog}: {message}; see {self.prog} --help\n")
