"""Exception types shared by every layer (leaf module: stdlib only)."""


class IngestError(Exception):
    """Base of every expected failure: logged as one line, never as a traceback."""


class ConfigError(IngestError):
    """The configuration is invalid.

    `problems` holds one line per problem, each naming the file, the key, the bad value and
    what is allowed, e.g. ``/etc/ingestd.toml: storage.sort = 'x': must be one of none, ...``.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class TranslationError(IngestError):
    """A storescp command line cannot be translated (unknown or unimplemented option)."""


class StorageError(IngestError):
    """An object could not be stored; `status` is the DIMSE status to answer."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
