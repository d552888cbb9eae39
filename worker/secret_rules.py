"""The project's one secret rule set: which values are secrets, and how text is masked.

Used by the worker runtime (``worker.env``), by ``syncagent provision`` (remote output) and,
as a verbatim copy, by the stdlib-only agent (``syncagent logs``, restart failure tails): the
agent must stay one file, so the block between the markers below is repeated in
``syncagent/agent.py`` and ``tests/test_secrets.py`` checks that both copies are identical.
Values themselves are read as python-dotenv reads them (the agent carries a parser that
matches it). Standard library only, Python 3.8+.
"""

import re
from urllib.parse import unquote, urlsplit

__all__ = ["MASK", "MASK_FLOOR", "SECRET_NAME", "mask", "secret_values"]

# --- begin secret rules (copied verbatim in syncagent/agent.py) ---
MASK = "***"
# Values shorter than this are never searched for in text: a one-character "secret" would
# turn "SyntaxError" into "Synta***Error". Validation refuses a WORKER_API_KEY under 16
# characters, so no real key is that short; a short URL password is still masked inside URLs.
MASK_FLOOR = 8
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*):([^@\s/]+)@")


def _url_passwords(value):
    """The passwords of the URLs in ``value``, as written and percent-decoded."""
    found = [m.group(2) for m in _URL_PASSWORD.finditer(value)]
    try:
        found.append(urlsplit(value.strip()).password or "")
    except ValueError:
        pass
    return [form for p in found if p for form in (p, unquote(p))]


def secret_values(values):
    """Return the secret strings among ``values`` (a name -> value mapping).

    A value is secret when its name looks like one (KEY, SECRET, TOKEN, PASSWORD, PASSWD,
    CREDENTIAL); the password of every URL is secret whatever the name. Values shorter than
    ``MASK_FLOOR`` are left out (see there).

    Returns:
        The secrets, longest first (so a secret containing another is masked whole).
    """
    found = set()
    for name, value in values.items():
        if not value:
            continue
        if SECRET_NAME.search(name):
            found.add(value)
        if "://" in value:
            found.update(_url_passwords(value))
    return tuple(sorted((s for s in found if len(s) >= MASK_FLOOR), key=lambda s: (-len(s), s)))


def mask(text, secrets=()):
    """Return ``text`` with every secret and every URL password replaced by ``***``.

    Args:
        text: any output (a log line, an error message).
        secrets: secret strings (see :func:`secret_values`); shorter than ``MASK_FLOOR``: ignored.
    """
    for secret in sorted((s for s in secrets if len(s) >= MASK_FLOOR), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return _URL_PASSWORD.sub(r"\1:" + MASK + "@", text)
# --- end secret rules ---
