"""``fleet keys create|list|revoke``: the API keys of a fleet's HTTP ingress.

The key file is the one the ingress reads (``fleet.spec.ingress.AuthSpec``): given with
``--keys-file``, else ``ingress.auth.keys_file`` of ``--spec``, else
``$FLEET_KEYS_FILE``, else ``~/.fleet/keys/<fleet>.json``. ``create`` prints the new key
once (it is stored only as its SHA-256 digest); running ingress replicas pick changes up
within ``ingress.auth.reload_s`` seconds. No Ray cluster is needed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fleet.cli.common import EXIT_USAGE, load_spec_or_exit
from fleet.security.keys import KeyFile, KeyFileError, Role, describe
from fleet.spec.ingress import AuthSpec


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "keys",
        help="create, list or revoke API keys of the HTTP ingress",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--fleet", default="fleet", help="fleet name (default: fleet)")
    where.add_argument("--spec", help="a fleet spec: its name and ingress.auth.keys_file")
    where.add_argument("--keys-file", help="the key file (overrides everything else)")
    where.add_argument("--json", action="store_true", help="print JSON")
    ks = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    c = ks.add_parser("create", parents=[where], help="make a key (printed once)")
    c.add_argument("--tenant", required=True, help="the tenant the key acts for")
    c.add_argument(
        "--role",
        action="append",
        choices=[r.value for r in Role],
        required=True,
        help="a role (repeat: --role submit --role read); admin reads /status and /metrics",
    )
    c.add_argument("--name", default="", help="a note to recognize the key by")
    c.set_defaults(func=_create)
    ls = ks.add_parser("list", parents=[where], help="list keys (never the keys themselves)")
    ls.add_argument("--all", action="store_true", help="include revoked keys")
    ls.set_defaults(func=_list)
    r = ks.add_parser("revoke", parents=[where], help="revoke a key by its id")
    r.add_argument("key_id", help="the key's id (k-xxxxxxxx, from `fleet keys list`)")
    r.set_defaults(func=_revoke)


def keys_path(args: argparse.Namespace) -> Path:
    if args.keys_file:
        return Path(args.keys_file).expanduser()
    if args.spec:
        spec = load_spec_or_exit(args.spec)
        return spec.ingress.auth.resolved_keys_file(spec.name)
    return AuthSpec().resolved_keys_file(args.fleet)


def _fail(msg: str) -> int:
    print(f"fleet keys: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _create(args: argparse.Namespace) -> int:
    path = keys_path(args)
    try:
        key, rec = KeyFile(path).create(args.tenant, args.role, args.name)
    except (ValueError, KeyFileError) as exc:
        return _fail(str(exc))
    if args.json:
        import json

        print(json.dumps({"key": key, **describe(rec), "keys_file": str(path)}))
    else:
        print(key)
        print(
            f"key {rec.id} for tenant {rec.tenant!r} ({', '.join(sorted(args.role))}), "
            f"in {path}. It is shown only now: keep it secret.",
            file=sys.stderr,
        )
    return 0


def _list(args: argparse.Namespace) -> int:
    path = keys_path(args)
    try:
        records = KeyFile(path).records()
    except KeyFileError as exc:
        return _fail(str(exc))
    rows = [describe(r) for r in records if args.all or r.active]
    if args.json:
        import json

        print(json.dumps({"keys_file": str(path), "keys": rows}))
        return 0
    if not rows:
        print(f"no keys in {path}")
        return 0
    for k in rows:
        made = time.strftime("%Y-%m-%d %H:%M", time.gmtime(k["created_unix_s"]))
        state = "active" if k["active"] else "revoked"
        print(
            f"{k['id']}  {k['tenant']:<20} {','.join(k['roles']):<18} {state:<8} "
            f"{made}Z  {k['name']}"
        )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    path = keys_path(args)
    try:
        rec = KeyFile(path).revoke(args.key_id)
    except KeyError as exc:
        return _fail(str(exc.args[0]))
    except KeyFileError as exc:
        return _fail(str(exc))
    print(
        f"revoked {rec.id} (tenant {rec.tenant!r}); ingress replicas refuse it within seconds"
    )
    return 0
