"""User-facing errors.

Every problem a user can fix (a missing file, a malformed Broden directory, an unknown layer, ...)
is raised as :class:`NeurosemError` with a one-line message that says what to do. The CLI prints it
as ``error: <message>`` and exits with status 2, without a traceback.
"""
from __future__ import annotations


class NeurosemError(Exception):
    """An error the user can fix; ``str(err)`` is one line that says how."""

    def __init__(self, message: str) -> None:
        text = str(message)
        if text.startswith("Caught ") and "Original Traceback" in text:
            # Re-raised by a torch DataLoader worker with the worker's traceback attached:
            # keep the original one-line message (the traceback's last line, "pkg.Error: msg").
            last = text.rstrip().splitlines()[-1]
            text = last.split(": ", 1)[1] if ": " in last else last
        # Keep the message on one line: the CLI prints it as is.
        super().__init__(" ".join(text.split()))


class DataError(NeurosemError):
    """A dataset (Broden, image folder, CIFAR root) is missing or malformed."""


class RunMismatchError(NeurosemError):
    """A run directory holds outputs made with other arguments."""


class RunLockedError(NeurosemError):
    """Another process is writing the same run directory (e.g. a second ``neurosem record``)."""


class StoreDamagedError(NeurosemError):
    """Stored activations do not match their checksums (the file was changed on disk)."""


class DiskFullError(NeurosemError):
    """The disk has not enough free space for what a command must write."""
