"""
The C{twistd mproxy} plugin.  Kept tiny: importing it must stay cheap and must
not fail, because twistd imports every plugin for every invocation.
"""

from twisted.application.service import ServiceMaker

mproxy = ServiceMaker(
    "mproxy",
    "mproxy.tap",
    "HTTP(S) reverse proxy for zero-downtime deploys",
    "mproxy",
)
