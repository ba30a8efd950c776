"""Every error class of tilepipe's services, in one place.

`PermanentError` marks an input that can never succeed: the runtime fails it at once instead
of retrying. The others name what went wrong for the operator; where one is also permanent it
says so by its base. (`messages` keeps its own two, `InvalidEvent` and `PathEscapeError`: it
imports nothing from `services`.)
"""

from __future__ import annotations


class PermanentError(Exception):
    """An input that can never succeed: fail now instead of retrying."""


class ConfigError(ValueError):
    """A configuration that cannot be used, with field names and reasons."""


class ManifestError(ValueError):
    """A manifest that cannot be used, with field names and reasons."""


class InvalidManifest(ManifestError, PermanentError):
    """A manifest that can never be used as it is (its content, or a path that is not a
    regular file): a stage fails its input at once. Other ManifestErrors (not found, a read
    error) may pass and are retried."""


class NotRegularFile(PermanentError, ValueError):
    """A path that is not a regular file: refused, never opened for reading, never retried."""


class CalibrationFileError(ValueError):
    """A calibration file that is missing, unreadable or malformed."""


class TemplateError(ValueError):
    """A template that cannot name the lab's files; the message names the template."""


class RawFormatError(PermanentError, ValueError):
    """A raw tile that is truncated, corrupt, or not what the manifest says: the file was
    complete when it was announced, so reading it again cannot help (a stage fails it at
    once with this reason)."""


class StorageConfigError(ValueError):
    """A destination that cannot be used as configured (bad URL, credentials file, key)."""


class StorageAccessError(Exception):
    """The store refused the credentials or the permission: retrying cannot help."""


class VerificationError(Exception):
    """A stored object does not match the local bytes it was uploaded from."""


class RawDeletionRefused(RuntimeError):
    """Deleting a raw file was asked for without a read-back verification."""


class ImportRefused(ValueError):
    """A scan configuration tilepipe cannot honour; the message names the field."""


class ResetUnsupported(RuntimeError):
    """The server predates consumer reset (`tilepipe replay --from-seq/--since`)."""
