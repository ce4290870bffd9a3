"""The one error hierarchy of adapterfmt.

Every error the library raises on purpose is an :class:`AdapterError`. Each subclass also inherits
the built-in exception that fits, so ``except ValueError`` keeps working for callers that do not
know about adapterfmt. Messages name the file (when there is one) and what is wrong.
"""

from __future__ import annotations

from os import PathLike


class AdapterError(Exception):
    """Base class of every error raised by adapterfmt."""

    def __init__(self, message: str, *, path: str | PathLike[str] | None = None) -> None:
        self.path = None if path is None else str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class FormatError(AdapterError, ValueError):
    """A file or manifest does not follow the adapterfmt spec (corrupt, truncated, wrong shapes)."""


class SpecVersionError(FormatError):
    """The manifest declares a spec major version this reader does not implement."""


class UnknownExtensionError(FormatError):
    """The manifest lists a ``must_understand`` extension that no installed plugin understands."""


class LimitError(FormatError):
    """An input exceeds a reader limit (header or JSON size, entry count, name length, dense size); the message
    names the environment variable that raises it (:mod:`adapterfmt.format.limits`)."""


class ChecksumError(FormatError):
    """Tensor bytes do not match the sha256 recorded in the manifest."""


class UnsafePathError(FormatError):
    """A path inside an adapter escapes its folder (``../x``, absolute paths, links)."""


class MissingFileError(AdapterError, FileNotFoundError):
    """A file or folder that should exist does not."""


class BaseMismatchError(AdapterError, ValueError):
    """The adapter was made for a different base model than the one given."""


class PluginError(AdapterError, RuntimeError):
    """A plugin is missing, broken, or does not support what was asked of it."""


class UnsupportedError(AdapterError, NotImplementedError):
    """The operation is well-formed but cannot be done for this input (e.g. a field with no equivalent)."""


class OutputExistsError(AdapterError, FileExistsError):
    """The output path exists and overwriting was not asked for."""


class HubError(AdapterError, RuntimeError):
    """Talking to the Hub failed (base class of the hub errors)."""


class RepoNotFoundError(HubError, LookupError):
    """The repository does not exist, or is private and the token cannot see it."""


class RevisionNotFoundError(HubError, LookupError):
    """The branch, tag or commit does not exist in the repository."""


class NotAnAdapterRepoError(HubError, LookupError):
    """The repository (at that revision) holds no adapterfmt adapter."""


class HubAuthError(HubError, PermissionError):
    """No token, or a token without the rights the operation needs."""


class HubTransferError(HubError, ConnectionError):
    """The server failed or the connection broke while transferring data."""


class PushConflictError(HubError):
    """The branch moved while pushing (another push landed first); nothing was committed."""


class AdapterNote(UserWarning):
    """Not an error: something a caller should know about what was done (a foreign format read and converted
    in memory ...). Issued with :func:`warnings.warn`; the ``adapter`` command prints each as one ``note:``
    line on stderr."""


def first_few(items: list[str], n: int = 3) -> str:
    """``items`` for a one-line message: the first ``n`` joined by "; ", then how many more there are."""
    return "; ".join(items[:n]) + (f"; and {len(items) - n} more" if len(items) > n else "")
