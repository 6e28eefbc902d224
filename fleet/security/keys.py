"""API keys: made at random, stored only as digests, each naming a tenant and roles.

A key is ``fleet_`` and 43 URL-safe characters: 32 bytes (256 bits) from ``secrets``.
The key file (JSON, written atomically by ``KeyFile``) holds for each key its id (``k-``
and 8 hex characters, for listing and revoking), the SHA-256 digest of the key, the
tenant, the roles, when it was made and, once revoked, when. The key itself is shown
once, by ``fleet keys create``, and stored nowhere.

Checking a request costs one SHA-256 of the presented key and one dict lookup by digest
(``KeyRing.authenticate``): the digest of a 256-bit random key reveals nothing about it,
so a lookup by digest needs no constant-time comparison. ``KeyRing`` re-reads the file
when its size or modification time changes (at most every ``reload_s``), so keys made or
revoked reach every ingress replica within seconds; a file that cannot be read or parsed
keeps the last good keys (and says why in ``KeyRing.error``), except that a file that
disappears revokes every key.

Roles: ``submit`` (``POST /tasks``, ``DELETE /tasks/{id}``), ``read`` (``GET
/tasks...``, the tenant's own ``/status``), ``admin`` (the whole ``/status`` and
``/metrics``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

KEY_PREFIX = "fleet_"
KEY_BYTES = 32
ID_PREFIX = "k-"
TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
FILE_VERSION = 1


class Role(str, Enum):
    SUBMIT = "submit"
    READ = "read"
    ADMIN = "admin"


def generate_key() -> str:
    """A new random key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def digest(key: str) -> str:
    """The SHA-256 digest of ``key`` (hex): what the key file stores."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def check_tenant(tenant: str) -> str:
    """A tenant name: lower-case letters, digits, ``-`` and ``_``, at most 63, starting
    with a letter or digit (it prefixes task ids, so it never holds ``:``)."""
    if not TENANT_PATTERN.match(tenant):
        raise ValueError(
            f"tenant {tenant!r}: use 1-63 lower-case letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return tenant


class KeyRecord(BaseModel):
    """One key as the key file holds it (never the key itself)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^k-[0-9a-f]{8}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tenant: str
    roles: frozenset[Role] = Field(min_length=1)
    name: str = Field(default="", max_length=200)
    created_unix_s: float
    revoked_unix_s: float | None = None

    @field_validator("tenant")
    @classmethod
    def _check_tenant(cls, v: str) -> str:
        return check_tenant(v)

    @property
    def active(self) -> bool:
        return self.revoked_unix_s is None


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = FILE_VERSION
    keys: list[KeyRecord] = []


class KeyFileError(ValueError):
    """A key file that cannot be read or is not a valid key file (says which and why)."""


class KeyFile:
    """A key file on disk: read, add a key, revoke one; every write is atomic (a
    temporary file in the same directory, then ``os.replace``), mode 0600."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def records(self) -> list[KeyRecord]:
        """Every key in the file (revoked ones too); none when the file does not exist."""
        if not self.path.exists():
            return []
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"key file {self.path}: {exc.strerror or exc}") from exc
        try:
            return _File.model_validate_json(raw).keys
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top)"
            raise KeyFileError(
                f"key file {self.path}: {where}: {first['msg']} ({exc.error_count()} "
                "problem(s))"
            ) from None

    def _write(self, records: Iterable[KeyRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = _File(keys=list(records)).model_dump(mode="json")
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".keys-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(body, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def create(
        self, tenant: str, roles: Iterable[Role | str], name: str = ""
    ) -> tuple[str, KeyRecord]:
        """Make a key for ``tenant`` with ``roles``; returns the key (shown once) and its
        record (stored)."""
        check_tenant(tenant)
        role_set = frozenset(Role(r) for r in roles)
        if not role_set:
            raise ValueError("roles: give at least one of submit, read, admin")
        records = self.records()
        taken = {r.id for r in records}
        key = generate_key()
        kid = ID_PREFIX + secrets.token_hex(4)
        while kid in taken:
            kid = ID_PREFIX + secrets.token_hex(4)
        rec = KeyRecord(
            id=kid,
            sha256=digest(key),
            tenant=tenant,
            roles=role_set,
            name=name,
            created_unix_s=time.time(),
        )
        self._write([*records, rec])
        return key, rec

    def revoke(self, key_id: str) -> KeyRecord:
        """Revoke the key with id ``key_id`` (KeyError naming it when there is none)."""
        records = self.records()
        for k, r in enumerate(records):
            if r.id == key_id:
                if r.active:
                    records[k] = r.model_copy(update={"revoked_unix_s": time.time()})
                    self._write(records)
                return records[k]
        raise KeyError(f"no key with id {key_id!r} in {self.path}")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: the key's id, tenant and roles."""

    key_id: str
    tenant: str
    roles: frozenset[Role]

    def may(self, role: Role) -> bool:
        return role in self.roles


class KeyRing:
    """The active keys of a key file, by digest, reloaded when the file changes.

    ``clock`` (monotonic seconds) paces the checks of the file (one ``stat`` per
    ``reload_s`` at most). Pure apart from reading the file.
    """

    def __init__(
        self, path: str | os.PathLike[str], reload_s: float, clock: Callable[[], float]
    ):
        self.file = KeyFile(path)
        self.reload_s = reload_s
        self._clock = clock
        self._by_digest: dict[str, Principal] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked_at = -float("inf")
        self.error: str | None = None
        self.loads = 0
        self.refresh(force=True)

    def __len__(self) -> int:
        return len(self._by_digest)

    def refresh(self, force: bool = False) -> None:
        """Re-read the file if it changed (at most every ``reload_s`` unless ``force``)."""
        now = self._clock()
        if not force and now - self._checked_at < self.reload_s:
            return
        self._checked_at = now
        try:
            st = self.file.path.stat()
        except FileNotFoundError:
            self._by_digest, self._stamp = {}, None
            self.error = f"key file {self.file.path} does not exist: no key is valid"
            return
        except OSError as exc:
            self.error = f"key file {self.file.path}: {exc.strerror or exc}"
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp and not force:
            return
        try:
            records = self.file.records()
        except KeyFileError as exc:
            self.error = f"{exc}; keeping the {len(self)} key(s) read before"
            return
        self._by_digest = {
            r.sha256: Principal(r.id, r.tenant, r.roles) for r in records if r.active
        }
        self._stamp = stamp
        self.error = None
        self.loads += 1

    def authenticate(self, key: str | None) -> Principal | None:
        """The principal of ``key``, or None (missing, unknown or revoked)."""
        self.refresh()
        if not key:
            return None
        return self._by_digest.get(digest(key))


def bearer(header: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, or None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    value = value.strip()
    return value or None


def describe(rec: KeyRecord) -> dict[str, Any]:
    """A key's record for listing (its digest left out)."""
    return {
        "id": rec.id,
        "tenant": rec.tenant,
        "roles": sorted(r.value for r in rec.roles),
        "name": rec.name,
        "created_unix_s": rec.created_unix_s,
        "revoked_unix_s": rec.revoked_unix_s,
        "active": rec.active,
    }
