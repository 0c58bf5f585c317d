"""
mproxy: a small HTTP(S) reverse proxy that makes web-app deploys zero-downtime.
"""

import os as _os

__version__ = "0.1.0"
__all__ = ["__version__"]

#: The socket-activation variables (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES)
#: and the upgrade handover (MPROXY_UPGRADE) this process started with.  Kept here, as mproxy is first imported, because
#: importing twisted.internet.endpoints takes them out of the environment.
#: L{mproxy.activation.startup_environment} hands them out once.
_startup_listen_env = {
    k: _os.environ[k]
    for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "MPROXY_UPGRADE")
    if k in _os.environ
}
