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
    def __init__(self, message: str = "service not found") -> None:
        super().__init__(message)


class HostConflict(MproxyError):
    def __init__(self, message: str = "host settings conflict with another service") -> None:
        super().__init__(message)


class DeployTimedOut(MproxyError):
    pass


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
