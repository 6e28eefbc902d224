"""Secrets out of what fleet shows: status, CLI output, error texts, logs.

A value is secret when it is an API key of the ingress (``fleet_`` and 43 URL-safe
characters), or the value of an ``agent_kwargs`` entry (any pool) whose name marks it
secret: it contains ``secret``, ``password``, ``passwd``, ``token``, ``api_key``,
``apikey``, ``credential`` or ``private_key`` (any case). Secrets are replaced by
``[redacted]`` wherever they appear in a string (an agent's exception text that quotes
its own key included), even for admins. ``redact_logs`` does the same to every log
record a fleet process makes (the ingress's replicas and the hosts install it), its
traceback included, whichever library logs it. Keep real secrets out of specs anyway: pass them
through the environment (``*_env`` fields name the variable), which fleet never echoes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

REDACTED = "[redacted]"
API_KEY_PATTERN = re.compile(r"fleet_[A-Za-z0-9_-]{43}")
SECRET_NAME = re.compile(
    r"secret|password|passwd|token|api_?key|credential|private_key", re.IGNORECASE
)
MIN_SECRET_CHARS = 4  # shorter values would redact ordinary words


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def secret_values(spec: Any) -> list[str]:
    """The values of secret-named ``agent_kwargs`` entries of every pool of ``spec``
    (strings, or the strings inside lists and mappings under such a name)."""
    out = {v for pool in getattr(spec, "pools", ()) for v in pool_secret_values(pool)}
    return sorted(out, key=len, reverse=True)  # longest first: no partial overlap


def pool_secret_values(pool: Any) -> list[str]:
    """``secret_values`` of one pool: its secret-named ``agent_kwargs`` and
    ``runtime_env.env_vars``, and the variable its ``llm.api_key_env`` names."""
    out: list[str] = []

    def collect(v: Any) -> None:
        if isinstance(v, str):
            if len(v) >= MIN_SECRET_CHARS:
                out.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                collect(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                collect(x)

    for name, value in (pool.agent_kwargs or {}).items():
        if is_secret_name(name):
            collect(value)
    env = (getattr(pool, "runtime_env", None) or {}).get("env_vars") or {}
    llm = getattr(pool, "llm", None)
    key_env = llm.api_key_env if llm is not None else None
    for name, value in env.items():  # a key given to the hosts' environment
        if is_secret_name(name) or name == key_env:
            collect(value)
    return out


class Redactor:
    """Replaces secrets in strings, recursively in JSON-like data."""

    def __init__(self, secrets: Iterable[str] = ()):
        values = [s for s in secrets if len(s) >= MIN_SECRET_CHARS]
        self._values = re.compile("|".join(re.escape(s) for s in values)) if values else None

    def text(self, s: str) -> str:
        s = API_KEY_PATTERN.sub(REDACTED, s)
        if self._values is not None:
            s = self._values.sub(REDACTED, s)
        return s

    def data(self, obj: Any) -> Any:
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, dict):
            return {
                k: REDACTED
                if isinstance(v, str) and v and isinstance(k, str) and is_secret_name(k)
                else self.data(v)
                for k, v in obj.items()
            }
        if isinstance(obj, list):
            return [self.data(x) for x in obj]
        if isinstance(obj, tuple):
            return tuple(self.data(x) for x in obj)
        return obj


def redactor_for(spec: Any) -> Redactor:
    return Redactor(secret_values(spec))


_log_redactor: Redactor | None = None


def redact_logs(redactor: Redactor) -> None:
    """Redact secrets from every log record this process makes from now on: its message
    (arguments merged in) and its traceback. Installs a log record factory once per
    process; a later call replaces the redactor (the newest spec's secrets)."""
    global _log_redactor
    first = _log_redactor is None
    _log_redactor = redactor
    if not first:
        return
    make = logging.getLogRecordFactory()

    def redacting(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        r = _log_redactor
        if r is None:
            return record
        try:
            record.msg, record.args = r.text(record.getMessage()), ()
        except Exception:  # a bad format string: keep the record as the logger made it
            return record
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = r.text(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = r.text(record.stack_info)
        return record

    logging.setLogRecordFactory(redacting)


def redact_log_text(s: str) -> str:
    """``s`` with the secrets ``redact_logs`` removes from log messages (unchanged before
    it is installed). For what a record carries besides its message: ``extra=``
    attributes are set after the record factory has run, so it never sees them."""
    r = _log_redactor
    return s if r is None else r.text(s)
