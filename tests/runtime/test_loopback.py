"""A cluster fleet starts binds to loopback only, and Ray's token auth stays on."""

from __future__ import annotations

import json
import subprocess
import sys

from fleet.spec.ingress import is_loopback

PROBE = r"""
import json, time, ipaddress, psutil, ray
from fleet.runtime.client import init_ray
from fleet.runtime.deploy import start_serve
init_ray(None)
start_serve(http=True)            # the HTTP proxy too: the widest default fleet offers
time.sleep(3)
me = psutil.Process()
procs = [me, *me.children(recursive=True)]
listening = []
for p in procs:
    try:
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                listening.append([p.name(), c.laddr.ip, c.laddr.port])
    except psutil.Error:
        pass
import os
from ray._private.authentication.authentication_utils import is_token_auth_enabled
auth = os.environ.get("RAY_AUTH_MODE")
token_auth = is_token_auth_enabled()
ray.shutdown()
print(json.dumps({"listening": listening, "auth_mode_env": auth, "token_auth": token_auth}))
"""


def test_loopback_check_itself():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not any(is_loopback(a) for a in ("0.0.0.0", "::", "192.0.2.2", "::ffff:10.0.0.1"))


def test_local_cluster_listens_on_loopback_only():
    r = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=180
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["listening"], "the probe must see the cluster's servers"
    exposed = [x for x in out["listening"] if not is_loopback(x[1])]
    assert exposed == [], f"listening beyond loopback: {exposed}"
    assert out["auth_mode_env"] != "disabled"
    assert out["token_auth"] is True, "Ray's token authentication must stay on"
