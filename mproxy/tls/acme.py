# -*- test-case-name: tests.test_tls_pebble -*-
"""
The blocking ACME client: one certificate order from start to finish with
certbot's C{acme} library (RFC 8555).

L{AcmeIssuer} is synchronous; L{mproxy.tls.orders.OrderRunner} runs
its C{issue} calls in a worker thread, one at a time per account.  It touches
the reactor only through the thread-safe L{IChallengeResponder}.

API::

    issuer = AcmeIssuer(directory_url, store.for_directory(directory_url),
                        challenges, email=None, ca_bundle=None)
    key_pem, chain_pem = issuer.issue("app1.example.com", "http-01")
        # or "tls-alpn-01"; raises IssueError

The account key (RSA 2048) and the registration are created on first use and
kept in the store; terms of service are agreed to automatically.  Storing the
certificate is the caller's job.
"""

from __future__ import annotations

import email.utils
import threading
import time
from typing import Any, Callable

import josepy as jose
import requests
from acme import challenges as acme_challenges
from acme import client as acme_client
from acme import crypto_util
from acme import errors as acme_errors
from acme import messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from zope.interface import implementer

from mproxy.tls.certs import generate_key_pem
from mproxy.tls.challenges import tls_alpn_certificate
from mproxy.tls.interfaces import IChallengeResponder, IDirectoryStore, IIssuer
from mproxy.tls.issuing import (
    HTTP_01,
    LETS_ENCRYPT,
    LETS_ENCRYPT_STAGING,
    TLS_ALPN_01,
    IssueError,
)

__all__ = [
    "AcmeIssuer",
    "IssueError",
    "LETS_ENCRYPT",
    "LETS_ENCRYPT_STAGING",
    "HTTP_01",
    "TLS_ALPN_01",
]

_PERMANENT = {"rejectedIdentifier", "unsupportedIdentifier", "caa", "malformed"}


def parse_retry_after(value: str | None, now: float) -> float | None:
    """
    Seconds from C{now} given a Retry-After header (delta-seconds or HTTP date).
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


class _Network(acme_client.ClientNetwork):
    """
    Remembers the last HTTP response so that error handling can read
    Retry-After.
    """

    last_response: requests.Response | None = None

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        response = super()._send_request(method, url, *args, **kwargs)
        self.last_response = response
        return response


class _EmptyResponse(acme_challenges.ChallengeResponse):
    """
    The C{{}} payload that tells the server a challenge is ready.
    """

    typ = "empty"

    def __bool__(self) -> bool:
        # acme sends an empty payload (a POST-as-GET) for falsy objects, and
        # a field-less object has length 0
        return True


def _challenge_type(challb: Any) -> str | None:
    chall = challb.chall
    if isinstance(chall, acme_challenges.UnrecognizedChallenge):
        return chall.jobj.get("type")
    return getattr(chall, "typ", None)


def _problem(error: Any) -> str:
    detail = getattr(error, "detail", None) or ""
    code = getattr(error, "code", None) or getattr(error, "typ", "") or ""
    text = detail or str(error)
    return f"{text} ({code})" if code and code not in text else text


def _validation_message(authzrs: Any) -> str:
    problems = []
    for authzr in authzrs:
        ident = authzr.body.identifier.value
        for challb in authzr.body.challenges:
            if challb.error is not None:
                problems.append(f"{ident}: {_challenge_type(challb)}: {_problem(challb.error)}")
    return "validation failed: " + ("; ".join(problems) or "no details")


@implementer(IIssuer)
class AcmeIssuer:
    """
    Obtains certificates from one ACME directory.  Not thread-safe: call
    C{issue} from one thread at a time.
    """

    def __init__(
        self,
        directory_url: str,
        store: IDirectoryStore,
        challenges: IChallengeResponder,
        email: str | None = None,
        ca_bundle: str | None = None,
        user_agent: str = "mproxy",
        timeout: float = 90.0,
        poll_interval: float = 0.25,
        sleep: Callable[[float], None] | None = None,
        now: Callable[[], float] = time.time,
        network_timeout: float = 15.0,
    ) -> None:
        self.directory_url = directory_url
        self.store = store
        self.challenges = challenges
        self.email = email
        self.ca_bundle = ca_bundle
        self.user_agent = user_agent
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._cancelled = threading.Event()
        self.sleep = sleep if sleep is not None else self._interruptible_sleep
        self.network_timeout = network_timeout
        self.now = now
        self._client: acme_client.ClientV2 | None = None
        self._net: _Network | None = None
        self._key: jose.JWKRSA | None = None

    def cancel(self) -> None:
        """
        Make an order in progress give up at its next wait (any thread);
        used when the service stops so that shutdown is not held up by a
        slow CA.  Further orders fail at once.
        """
        self._cancelled.set()

    def _interruptible_sleep(self, seconds: float) -> None:
        if self._cancelled.wait(seconds):
            raise IssueError("stopped")

    # -- account ----------------------------------------------------------

    def _account_key(self) -> jose.JWKRSA:
        pem = self.store.load_account_key()
        if pem is None:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            self.store.save_account_key(pem)
            pem = self.store.load_account_key() or pem
        return jose.JWKRSA(key=serialization.load_pem_private_key(pem, password=None))

    def _ensure_client(self) -> acme_client.ClientV2:
        if self._client is not None:
            return self._client
        self._key = self._account_key()
        verify: Any = self.ca_bundle or True
        net = _Network(self._key, user_agent=self.user_agent, verify_ssl=verify, timeout=self.network_timeout)
        self._net = net
        directory = acme_client.ClientV2.get_directory(self.directory_url, net)
        client = acme_client.ClientV2(directory, net)
        stored = self.store.load_account()
        regr = None
        if stored:
            try:
                regr = messages.RegistrationResource.json_loads(stored)
            except (jose.DeserializationError, ValueError):
                regr = None
        if regr is None:
            new = messages.NewRegistration.from_data(
                email=self.email or None, terms_of_service_agreed=True
            )
            try:
                regr = client.new_account(new)
            except acme_errors.ConflictError as conflict:
                regr = messages.RegistrationResource(
                    uri=conflict.location, body=messages.Registration()
                )
            self.store.save_account(regr.json_dumps())
        net.account = regr
        self._client = client
        return client

    def _reset(self, forget_account: bool = False) -> None:
        if forget_account:
            self.store.forget_account()
        self._client = None
        self._net = None

    # -- orders -----------------------------------------------------------

    def issue(self, host: str, challenge_type: str) -> tuple[bytes, bytes]:
        """
        Run one order for C{host} answering C{challenge_type}.

        @return: C{(key_pem, chain_pem)} of the new certificate.
        @raise IssueError: on any failure.
        """
        attempts = 0
        while True:
            attempts += 1
            try:
                return self._issue(host, challenge_type)
            except IssueError:
                raise
            except messages.Error as e:
                code = e.code or ""
                if code == "accountDoesNotExist" and attempts < 2:
                    self._reset(forget_account=True)
                    continue
                if code == "badNonce" and attempts < 3:
                    continue
                raise self._error(e) from None
            except acme_errors.ValidationError as e:
                raise IssueError(
                    _validation_message(e.failed_authzrs), challenge_failed=True
                ) from None
            except acme_errors.TimeoutError:
                raise IssueError("timed out waiting for the ACME server") from None
            except requests.RequestException as e:
                self._reset()
                raise IssueError(f"cannot reach the ACME server: {e}") from None
            except Exception as e:  # a library bug must not kill the service
                self._reset()
                raise IssueError(f"{type(e).__name__}: {e}") from None

    def _error(self, e: messages.Error) -> IssueError:
        retry_after = None
        response = self._net.last_response if self._net is not None else None
        if response is not None:
            retry_after = parse_retry_after(response.headers.get("Retry-After"), self.now())
        code = e.code or ""
        return IssueError(
            _problem(e),
            retry_after=retry_after,
            rate_limited=code == "rateLimited",
            permanent=code in _PERMANENT,
        )

    def _key_authorization(self, challb: Any) -> tuple[str, str]:
        chall = challb.chall
        assert self._key is not None
        if isinstance(chall, acme_challenges.KeyAuthorizationChallenge):
            token = chall.encode("token")
            return token, chall.key_authorization(self._key)
        token = chall.jobj["token"]
        thumbprint = jose.b64encode(self._key.thumbprint()).decode()
        return token, f"{token}.{thumbprint}"

    def _issue(self, host: str, challenge_type: str) -> tuple[bytes, bytes]:
        if self._cancelled.is_set():
            raise IssueError("stopped")
        client = self._ensure_client()
        deadline = self.now() + self.timeout
        key_pem = generate_key_pem()
        csr = crypto_util.make_csr(key_pem, [host])
        order = client.new_order(csr)
        cleanup: list[Callable[[], None]] = []
        try:
            pending = []
            for authzr in order.authorizations:
                if authzr.body.status == messages.STATUS_VALID:
                    continue
                challb = next(
                    (c for c in authzr.body.challenges if _challenge_type(c) == challenge_type),
                    None,
                )
                if challb is None:
                    raise IssueError(
                        f"the ACME server offers no {challenge_type} challenge",
                        challenge_failed=True,
                    )
                token, key_authz = self._key_authorization(challb)
                name = authzr.body.identifier.value
                if challenge_type == HTTP_01:
                    self.challenges.add_http01(token, key_authz)
                    cleanup.append(lambda t=token: self.challenges.remove_http01(t))
                elif challenge_type == TLS_ALPN_01:
                    self.challenges.add_tls_alpn01(name, tls_alpn_certificate(name, key_authz))
                    cleanup.append(lambda n=name: self.challenges.remove_tls_alpn01(n))
                else:
                    raise IssueError(f"unsupported challenge type {challenge_type}")
                client.answer_challenge(challb, _EmptyResponse())
                pending.append(authzr)
            for authzr in pending:
                self._wait_valid(client, authzr, deadline)
        finally:
            for undo in cleanup:
                undo()
        chain_pem = self._finalize(client, order, deadline)
        return key_pem, chain_pem.encode()

    def _wait_valid(self, client: acme_client.ClientV2, authzr: Any, deadline: float) -> None:
        delay = self.poll_interval
        while True:
            authzr, response = client.poll(authzr)
            status = authzr.body.status
            if status == messages.STATUS_VALID:
                return
            if status not in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
                raise IssueError(_validation_message([authzr]), challenge_failed=True)
            if self.now() >= deadline:
                raise IssueError("timed out waiting for challenge validation")
            asked = parse_retry_after(response.headers.get("Retry-After"), self.now())
            wait = min(max(delay, min(asked or 0, 10.0)), max(0.0, deadline - self.now()))
            self.sleep(wait)
            delay = min(delay * 2, 2.0)

    def _finalize(self, client: acme_client.ClientV2, order: Any, deadline: float) -> str:
        post_as_get = getattr(client, "_post_as_get", None)
        if post_as_get is None:  # pragma: no cover - only if acme drops the private helper
            done = client.finalize_order(order, _datetime(deadline))
            return done.fullchain_pem
        try:
            order = client.begin_finalization(order)
        except messages.Error as e:
            if e.code != "orderNotReady":
                raise
        delay = self.poll_interval
        while True:
            body = order.body
            if body.status == messages.STATUS_VALID and body.certificate:
                return post_as_get(body.certificate).text
            if body.status == messages.STATUS_INVALID:
                raise IssueError(
                    "order failed: " + (_problem(body.error) if body.error else "no details")
                )
            if self.now() >= deadline:
                raise IssueError("timed out waiting for the certificate")
            self.sleep(delay)
            delay = min(delay * 2, 2.0)
            response = post_as_get(order.uri)
            order = order.update(body=messages.Order.from_json(response.json()))
            if order.body.status == messages.STATUS_READY:
                order = client.begin_finalization(order)


def _datetime(ts: float) -> Any:
    import datetime

    return datetime.datetime.fromtimestamp(ts)
