"""Connecting data preparation to Ray: a private local instance, or a named cluster with its credentials.

Without an address, ``ray.init()`` attaches to whatever cluster this machine knows of (a running ``ray
start --head``, or the ``ray_current_cluster`` file one left behind in Ray's temp directory) and then
refuses the resources we ask for. ``lmscale prepare`` instead always starts its own instance
(``address="local"``) unless told which cluster to use.

A named cluster may require token authentication (the default for clusters Ray starts in recent releases).
Ray's client only sends a token when ``RAY_AUTH_MODE=token`` is set, and against a cluster that wants one
it retries for 20 seconds before raising a bare ``ConnectionError``; against an address nobody answers at, for
40. So the cluster is probed first, once: an unreachable address or a missing or rejected token is one line.
The token comes from where Ray looks for it: ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` names, or
``~/.ray/auth_token`` (``ray get-auth-token`` prints it on a machine of the cluster).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from lmscale.errors import LmscaleError, one_line

T = TypeVar("T")
REACH_TIMEOUT_SECONDS = 5.0
TOKEN_HELP = (
    "set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it, or put it in ~/.ray/auth_token "
    "(`ray get-auth-token` prints it on the head node)"
)


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` of a cluster's GCS (the address ``ray start --head`` prints)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise LmscaleError(f"--ray-address {address!r}: expected HOST:PORT of the head's GCS (e.g. 10.0.0.1:6379)")
    return host.strip("[]"), int(port)


def check_reachable(address: str) -> None:
    host, port = split_address(address)
    try:
        socket.create_connection((host, port), timeout=REACH_TIMEOUT_SECONDS).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise LmscaleError(f"--ray-address {address}: cannot reach the Ray head there ({reason})") from None


# Run in a child process: Ray's C++ client logs a refusal to the terminal, and may exit its process outright
# on an unexpected answer; the parent turns the child's exit into one line either way.
# Ray 2 has no public client that asks the GCS for one answer without ray.init (which hangs on a head that
# refuses), hence the private GcsClient; tests/test_private_apis.py fails if it disappears.
GCS_PROBE = """
import sys
from ray._raylet import GcsClient
from ray.exceptions import AuthenticationError
try:
    GcsClient(address=sys.argv[1]).cluster_id
except AuthenticationError:
    sys.exit(77)
"""
REFUSED = 77
PROBE_TIMEOUT_SECONDS = 90


def authenticated(connect: Callable[[], T | None], where: str) -> T | None:
    """``connect()``'s result; when the cluster refuses it for want of a token (``connect`` returns None) and
    one is available, with token authentication switched on. ``where`` names the cluster in the one-line
    failure."""
    # Token authentication has no public API to ask whether a token is present or to re-read RAY_AUTH_MODE
    # (private names; tests/test_private_apis.py fails if they disappear).
    from ray._raylet import AuthenticationTokenLoader, Config

    token_mode = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    if token_mode and not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        raise LmscaleError(f"{where}: RAY_AUTH_MODE=token is set but there is no Ray token; {TOKEN_HELP}")
    result = connect()
    if result is not None:
        return result
    if token_mode:
        raise LmscaleError(f"{where}: the cluster rejected the Ray token; {TOKEN_HELP}")
    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        raise LmscaleError(f"{where}: the cluster requires token authentication; {TOKEN_HELP}")
    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")  # Ray caches its settings at import: make it read RAY_AUTH_MODE again
    result = connect()
    if result is None:
        raise LmscaleError(f"{where}: the cluster rejected the Ray token; {TOKEN_HELP}")
    return result


def check_cluster(address: str) -> None:
    """Fail in one line unless the cluster at ``address`` is reachable and accepts this process (its first
    request, where authentication happens)."""
    where = f"--ray-address {address}"

    def probe() -> bool | None:
        try:
            result = subprocess.run([sys.executable, "-c", GCS_PROBE, address], capture_output=True, text=True,
                                    timeout=PROBE_TIMEOUT_SECONDS)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise LmscaleError(f"{where}: the Ray head did not answer within {PROBE_TIMEOUT_SECONDS} s") from None
        if result.returncode == REFUSED:
            return None
        if result.returncode != 0:
            reason = one_line(result.stderr, limit=300) if result.stderr.strip() else f"exit code {result.returncode}"
            raise LmscaleError(f"{where}: the Ray head did not accept a connection ({reason})")
        return True

    check_reachable(address)
    authenticated(probe, where)


def start_ray(address: str | None, workers: int, runtime_env: dict[str, Any]) -> Any:
    """Ray, initialised: attached to the cluster at ``address`` (``check_cluster`` passed), or to a new local
    instance of ``workers`` CPUs."""
    import ray

    if address is None:
        # The private instance is lmscale's own, its token too: Ray's notice that it enabled token
        # authentication (logged at every start) tells the user nothing to do.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address="local", num_cpus=workers, include_dashboard=False, runtime_env=runtime_env,
                 logging_level=logging.WARNING)  # fmt: skip
        return ray
    ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=True)
    return ray
