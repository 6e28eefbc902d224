"""API keys: random, stored as digests, reloaded when the file changes; the CLI."""

from __future__ import annotations

import json
import os

import pytest

from fleet.cli.main import main
from fleet.security.keys import (
    KEY_PREFIX,
    KeyFile,
    KeyFileError,
    KeyRing,
    Role,
    bearer,
    digest,
    generate_key,
)
from tests.utils import FakeClock


def test_keys_are_256_bit_random_and_only_their_digest_is_stored(tmp_path):
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200
    for k in keys:
        assert k.startswith(KEY_PREFIX) and len(k) == len(KEY_PREFIX) + 43  # 32 bytes
    f = KeyFile(tmp_path / "k.json")
    key, rec = f.create("acme", ["submit", "read"], name="ci")
    text = (tmp_path / "k.json").read_text()
    assert key not in text and digest(key) in text and rec.sha256 == digest(key)
    assert oct(os.stat(tmp_path / "k.json").st_mode & 0o777) == "0o600"
    assert rec.roles == {Role.SUBMIT, Role.READ} and rec.tenant == "acme" and rec.active


@pytest.mark.parametrize(
    "tenant,roles,needle",
    [
        ("Acme", ["read"], "tenant 'Acme'"),
        ("a:b", ["read"], "tenant 'a:b'"),
        ("", ["read"], "tenant ''"),
        ("acme", [], "roles"),
        ("acme", ["root"], "'root'"),
    ],
)
def test_bad_tenant_or_roles_are_refused_by_name(tmp_path, tenant, roles, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        KeyFile(tmp_path / "k.json").create(tenant, roles)
    assert not (tmp_path / "k.json").exists()


def test_the_ring_finds_keys_by_digest_and_follows_the_file(tmp_path):
    path = tmp_path / "k.json"
    f = KeyFile(path)
    a, rec_a = f.create("acme", ["submit"])
    clock = FakeClock(0.0)
    ring = KeyRing(path, reload_s=2.0, clock=clock)
    who = ring.authenticate(a)
    assert who is not None and who.tenant == "acme" and who.may(Role.SUBMIT)
    assert not who.may(Role.READ)
    assert ring.authenticate(a + "x") is None and ring.authenticate(None) is None
    assert ring.authenticate(generate_key()) is None
    b, _ = f.create("globex", ["read"])
    assert ring.authenticate(b) is None  # not re-read before reload_s
    clock.advance(2.0)
    assert ring.authenticate(b).tenant == "globex"
    f.revoke(rec_a.id)
    clock.advance(2.0)
    assert ring.authenticate(a) is None and ring.authenticate(b) is not None
    # A broken file keeps the last good keys (and says why); a deleted one revokes all.
    path.write_text("{not json")
    clock.advance(2.0)
    assert ring.authenticate(b) is not None and "key file" in ring.error
    path.unlink()
    clock.advance(2.0)
    assert ring.authenticate(b) is None and "does not exist" in ring.error


def test_a_bad_key_file_is_an_error_naming_the_file_and_field(tmp_path):
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"keys": [{"id": "k-1", "tenant": "x"}]}))
    with pytest.raises(KeyFileError, match=r"k\.json: keys\.0\.id"):
        KeyFile(path).records()


def test_bearer_header_parsing():
    assert bearer("Bearer abc") == "abc" and bearer("bearer  abc ") == "abc"
    assert bearer(None) is None and bearer("Basic abc") is None and bearer("Bearer ") is None


def test_fleet_keys_create_list_revoke(tmp_path, capsys):
    path = str(tmp_path / "keys.json")
    assert (
        main(["keys", "create", "--keys-file", path, "--tenant", "acme", "--role", "read"])
        == 0
    )
    key = capsys.readouterr().out.strip()
    assert key.startswith(KEY_PREFIX)
    assert main(["keys", "list", "--keys-file", path, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["keys"]
    assert [k["tenant"] for k in listed] == ["acme"] and key not in json.dumps(listed)
    kid = listed[0]["id"]
    assert main(["keys", "revoke", "--keys-file", path, kid]) == 0
    capsys.readouterr()
    assert main(["keys", "list", "--keys-file", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keys"] == []  # revoked ones need --all
    assert main(["keys", "revoke", "--keys-file", path, "k-00000000"]) == 2
    assert "no key with id 'k-00000000'" in capsys.readouterr().err
    assert (
        main(["keys", "create", "--keys-file", path, "--tenant", "Bad", "--role", "read"]) == 2
    )
    assert "tenant 'Bad'" in capsys.readouterr().err
