"""The project's exception family. Every message is one line a user can act on."""

import re


def one_line(e: BaseException | str, limit: int = 300) -> str:
    """The first line of an exception's (or a message's) text, for a one-line error; its type when it has none."""
    text = (e if isinstance(e, str) else str(e)).strip() or ("" if isinstance(e, str) else type(e).__name__)
    return text.splitlines()[0][:limit] if text else text


class IterdpoError(Exception):
    """Base class: the CLI prints ``Error: <message>`` on one line and exits 1.

    Messages speak the library's language (config field names such as `num_responses`); `option` names the field
    a message is about, so the CLI can say `--num-responses` instead where the user typed a flag."""

    def __init__(self, message: str = "", *, option: str | None = None):
        super().__init__(message)
        self.option = option


class InputError(IterdpoError):
    """Bad user input: a file, a column, a size, an option value."""


class CatalogError(IterdpoError):
    """The catalog file is missing, corrupt, too new, or holds no such snapshot."""


class CatalogBusy(CatalogError):
    """Another process held the catalog longer than the lock timeout."""


class NotFound(CatalogError):
    """An unknown snapshot id, id prefix or tag."""


_SECRET_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)[^\s\"',;]+"),  # an echoed Authorization header
    re.compile(r"\bsk-[A-Za-z0-9_\-]{4,}"),  # OpenAI-style keys
    re.compile(r"(?i)((?:api[_-]?key|token|authorization)[\"']?\s*[:=]\s*[\"']?)(?!bearer\s)[^\s\"',;}]+"),
    re.compile(r"(//)[^/@\s]+(?=@)"),  # credentials in a URL
)


def redact(text: str | None, *secrets: str | None) -> str:
    """`text` without the given secrets or anything shaped like a key: error bodies of some servers echo the
    request's Authorization header, and they end up on a user's terminal and in CI logs."""
    text = text or ""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "***", text)
    return text
