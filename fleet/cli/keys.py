"""``fleet keys create|list|revoke``: the API keys of a fleet's HTTP ingress.

The key file is the one the ingress reads (``fleet.spec.ingress.AuthSpec``): given with
``--keys-file``, else ``ingress.auth.keys_file`` of ``--spec``, else
``$FLEET_KEYS_FILE``, else ``~/.fleet/keys/<fleet>.json`` (the fleet named by ``--fleet``,
or by ``--spec``; one of the four must say which file). ``create`` prints the new key
once (it is stored only as its SHA-256 digest); running ingress replicas pick changes up
within ``ingress.auth.reload_s`` seconds. No Ray cluster is needed.

Exit status: 0 on success, 2 for a bad argument, key file or key id.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from fleet.cli.common import EXIT_OK, CliError, load_spec_or_exit
from fleet.security.keys import KeyFile, Role, describe
from fleet.spec.ingress import KEYS_FILE_ENV, AuthSpec


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "keys",
        help="create, list or revoke API keys of the HTTP ingress",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--fleet",
        default=None,
        help="the fleet whose keys (its file: ~/.fleet/keys/FLEET.json)",
    )
    where.add_argument("--spec", help="a fleet spec: its name and ingress.auth.keys_file")
    where.add_argument("--keys-file", help="the key file (overrides everything else)")
    where.add_argument(
        "--json", action="store_true", help="print the result as one JSON object on stdout"
    )
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
    if args.fleet is None and not os.environ.get(KEYS_FILE_ENV):
        # No default fleet: a key made for a fleet no ingress serves would be a silent
        # mistake (the ingress of fleet "demo" reads ~/.fleet/keys/demo.json).
        raise CliError(
            f"which fleet's keys? give --fleet NAME, --spec SPEC or --keys-file FILE "
            f"(or set ${KEYS_FILE_ENV})"
        )
    return AuthSpec().resolved_keys_file(args.fleet or "")


def _create(args: argparse.Namespace) -> int:
    path = keys_path(args)
    key, rec = KeyFile(path).create(args.tenant, args.role, args.name)  # ValueError: 2
    if args.json:
        print(json.dumps({"key": key, **describe(rec), "keys_file": str(path)}))
    else:
        print(key)
        print(
            f"key {rec.id} for tenant {rec.tenant!r} ({', '.join(sorted(args.role))}), "
            f"in {path}. It is shown only now: keep it secret.",
            file=sys.stderr,
        )
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    path = keys_path(args)
    records = KeyFile(path).records()  # KeyFileError (a ValueError): exit 2
    rows = [describe(r) for r in records if args.all or r.active]
    if args.json:
        print(json.dumps({"keys_file": str(path), "keys": rows}))
        return EXIT_OK
    if not rows:
        print(f"no keys in {path}")
        return EXIT_OK
    for k in rows:
        made = time.strftime("%Y-%m-%d %H:%M", time.gmtime(k["created_unix_s"]))
        state = "active" if k["active"] else "revoked"
        print(
            f"{k['id']}  {k['tenant']:<20} {','.join(k['roles']):<18} {state:<8} "
            f"{made}Z  {k['name']}"
        )
    return EXIT_OK


def _revoke(args: argparse.Namespace) -> int:
    path = keys_path(args)
    try:
        rec = KeyFile(path).revoke(args.key_id)  # KeyFileError (a ValueError): exit 2
    except KeyError as exc:  # no such key id: bad input, not a bug
        raise CliError(str(exc.args[0])) from exc
    if args.json:
        print(json.dumps({**describe(rec), "keys_file": str(path)}))
    else:
        print(
            f"revoked {rec.id} (tenant {rec.tenant!r}); ingress replicas refuse it "
            "within seconds"
        )
    return EXIT_OK
