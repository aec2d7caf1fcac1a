"""The error hierarchy. Messages say what was wrong and what to do about it."""


class IotaError(Exception):
    """Root of every error iota raises on purpose."""


class CodecError(IotaError, ValueError):
    """A tensor or codec spec that cannot be encoded as asked."""


class FrameError(CodecError):
    """A malformed, truncated, corrupted or hostile wire frame."""
