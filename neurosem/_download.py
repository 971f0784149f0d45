"""Keeping torch.hub's ``Downloading: ...`` line out of sight when the download cannot start."""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator


class HeldDownloadLine:
    """Holds torch.hub's ``Downloading: URL to FILE`` line (written to stdout) until the download shows
    progress on stderr; it is then written to stderr, before the bar. When the connection fails, the
    line is never shown: the one-line error says it all, and stdout stays clean either way.

    Example:
        >>> with HeldDownloadLine().active():  # doctest: +SKIP
        ...     torchvision.models.get_model("resnet18", weights="DEFAULT")
    """

    def __init__(self) -> None:
        self.held = ""
        self.stdout, self.stderr = sys.stdout, sys.stderr

    def release(self) -> None:
        if self.held:
            self.stderr.write(self.held)
            self.held = ""

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        out, err = _Stream(self.stdout, self._out), _Stream(self.stderr, self._err)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):  # type: ignore[type-var]
            yield
        self.release()

    def _out(self, text: str) -> bool:
        if text.startswith("Downloading"):
            self.held += text
            return True
        return False

    def _err(self, text: str) -> bool:
        self.release()
        return False


class _Stream:
    """A text stream passing writes to ``stream`` unless ``hook(text)`` takes them."""

    def __init__(self, stream: Any, hook: Any) -> None:
        self.stream, self.hook = stream, hook

    def write(self, text: str) -> int:
        return len(text) if self.hook(text) else self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)
