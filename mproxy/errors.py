"""
Domain errors.  Each is declared on the AMP commands that can raise it
(L{mproxy.control.commands}) so that the CLI can print its message.
"""


class MproxyError(Exception):
    """
    Base class: C{str(error)} is the message shown to the user after C{Error: }.
    """


class InvalidOptions(MproxyError):
    pass


class InvalidTarget(MproxyError):
    pass


class ServiceNotFound(MproxyError):
    """
    No service of that name.  Raise it with L{named}; the plain constructor
    takes the whole message, as AMP rebuilds it on the client.
    """

    @classmethod
    def named(cls, service: str) -> "ServiceNotFound":
        return cls(f"service not found: {service}")


class HostConflict(MproxyError):
    """
    Another service already serves one of the (host, path prefix) pairs.
    Raise it with L{held_by}, which names the pair and the service.
    """

    @classmethod
    def held_by(cls, host: str, prefix: str, holder: str) -> "HostConflict":
        where = f"host {host}" if host else "the default host (no --host)"
        if prefix != "/":
            where += f" path {prefix}"
        return cls(
            f"host settings conflict with another service: {where} is served by "
            f"service {holder}"
        )


class DeployTimedOut(MproxyError):
    pass


class DeployCancelled(MproxyError):
    """
    The deploy was cancelled (its client went away) before the switch; the
    old targets keep serving.
    """


class RolloutNotSet(MproxyError):
    def __init__(self, message: str = "rollout target not set") -> None:
        super().__init__(message)


class StateError(MproxyError):
    """
    The state file exists but cannot be read or parsed.
    """


class CertificateError(MproxyError):
    pass


class ErrorPagesError(MproxyError):
    pass


class UpgradeError(MproxyError):
    """
    The upgrade cannot be done; the server runs on as it was.
    """


class UpgradeInProgress(MproxyError):
    """
    A control command arrived while an upgrade is under way: it was not
    carried out; it can be sent again once the new server answers.
    """


class StartupError(MproxyError):
    """
    The server cannot start: a port or the control socket cannot be used.
    """
