"""
Tests for L{mproxy.config}: server option defaults, environment variables and
path resolution.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from mproxy.cli import parsing
from mproxy.config import (
    LETS_ENCRYPT,
    SERVER_OPTIONS,
    ServerConfig,
    parse_bool,
    parse_port,
    parse_workers,
    resolve_config,
    socket_path,
    state_dir,
    usable_cpus,
)
from mproxy.errors import InvalidOptions

HOME = os.path.expanduser("~")


class ParseTests(SynchronousTestCase):
    def test_bool(self) -> None:
        """
        Booleans accept the usual spellings, case-insensitively.
        """
        for text in ("1", "t", "T", "true", "TRUE", "True", "yes", "on"):
            self.assertIs(parse_bool(text), True, text)
        for text in ("0", "f", "F", "false", "FALSE", "False", "no", "off"):
            self.assertIs(parse_bool(text), False, text)
        for text in ("", "maybe", "2"):
            self.assertRaises(ValueError, parse_bool, text)

    def test_port(self) -> None:
        """
        Ports are decimal integers from 0 to 65535.
        """
        self.assertEqual(parse_port("8080"), 8080)
        self.assertEqual(parse_port("0"), 0)
        self.assertEqual(parse_port(" 443 "), 443)
        for text in ("", "http", "-1", "65536", "0x50", "80.0"):
            self.assertRaises(ValueError, parse_port, text)


class WorkersTests(SynchronousTestCase):
    def test_parse_workers(self) -> None:
        """
        C{--workers} is a number of processes or C{auto}, one per usable CPU.
        """
        self.assertEqual(parse_workers("1"), 1)
        self.assertEqual(parse_workers(" 4 "), 4)
        self.assertEqual(parse_workers("auto"), usable_cpus())
        self.assertEqual(parse_workers("AUTO"), usable_cpus())
        for text in ("", "0", "-1", "two", "1.5", "65"):
            self.assertRaises(ValueError, parse_workers, text)

    def test_usable_cpus_is_the_affinity(self) -> None:
        self.assertEqual(usable_cpus(), len(os.sched_getaffinity(0)))

    def test_env_and_flag(self) -> None:
        """
        C{$MPROXY_WORKERS} / C{$WORKERS} set it; a bad value is an error
        naming the variable.
        """
        self.assertEqual(resolve_config({}, {"WORKERS": "3"}).workers, 3)
        self.assertEqual(resolve_config({}, {"MPROXY_WORKERS": "auto", "WORKERS": "3"}).workers,
                         usable_cpus())
        self.assertEqual(resolve_config({"workers": 1}, {"WORKERS": "3"}).workers, 1)
        with self.assertRaises(InvalidOptions) as cm:
            resolve_config({}, {"WORKERS": "many"})
        self.assertIn("$WORKERS", str(cm.exception))


class ResolveTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """
        Without flags or environment, the documented defaults apply.
        """
        config = resolve_config({}, {})
        self.assertEqual(
            config,
            ServerConfig(
                http_port=80, https_port=443, metrics_port=0, bind="",
                socket="/tmp/mproxy.sock",
                state_dir=os.path.join(HOME, ".config", "mproxy"),
                acme_directory=LETS_ENCRYPT, acme_email="", acme_ca_bundle="", debug=False,
                workers=usable_cpus(),
            ),
        )

    def test_plain_env(self) -> None:
        """
        C{<NAME>} sets an option's value.
        """
        config = resolve_config({}, {"HTTP_PORT": "8080", "DEBUG": "true", "BIND": "127.0.0.1",
                                     "ACME_EMAIL": "ops@example.com"})
        self.assertEqual(config.http_port, 8080)
        self.assertTrue(config.debug)
        self.assertEqual(config.bind, "127.0.0.1")
        self.assertEqual(config.acme_email, "ops@example.com")

    def test_prefixed_env_wins(self) -> None:
        """
        C{MPROXY_<NAME>} beats C{<NAME>}.
        """
        config = resolve_config({}, {"HTTP_PORT": "8080", "MPROXY_HTTP_PORT": "9090"})
        self.assertEqual(config.http_port, 9090)
        config = resolve_config({}, {"MPROXY_HTTPS_PORT": "8443"})
        self.assertEqual(config.https_port, 8443)

    def test_flag_wins(self) -> None:
        """
        An explicit flag beats both environment variables.
        """
        config = resolve_config(
            {"http_port": 7070, "debug": False},
            {"HTTP_PORT": "8080", "MPROXY_HTTP_PORT": "9090", "MPROXY_DEBUG": "1"},
        )
        self.assertEqual(config.http_port, 7070)
        self.assertFalse(config.debug)

    def test_none_is_not_given(self) -> None:
        """
        A flag whose value is C{None} was not given.
        """
        config = resolve_config({"http_port": None}, {"HTTP_PORT": "8080"})
        self.assertEqual(config.http_port, 8080)

    def test_empty_env_ignored(self) -> None:
        """
        An empty variable counts as unset.
        """
        config = resolve_config({}, {"MPROXY_HTTP_PORT": "", "HTTP_PORT": "8080"})
        self.assertEqual(config.http_port, 8080)

    def test_bad_env(self) -> None:
        """
        A value that does not parse is an error naming the variable.
        """
        with self.assertRaises(InvalidOptions) as cm:
            resolve_config({}, {"MPROXY_HTTP_PORT": "eighty"})
        self.assertIn("$MPROXY_HTTP_PORT", str(cm.exception))
        self.assertIn("eighty", str(cm.exception))
        with self.assertRaises(InvalidOptions) as cm:
            resolve_config({}, {"METRICS_PORT": "99999"})
        self.assertIn("$METRICS_PORT", str(cm.exception))
        with self.assertRaises(InvalidOptions) as cm:
            resolve_config({}, {"DEBUG": "maybe"})
        self.assertIn("$DEBUG", str(cm.exception))

    def test_bad_env_overridden_by_flag(self) -> None:
        """
        A bad value in the environment does not matter when the flag is given.
        """
        config = resolve_config({"http_port": 81}, {"HTTP_PORT": "eighty"})
        self.assertEqual(config.http_port, 81)

    def test_every_option_has_env(self) -> None:
        """
        Every server option reads its variable.
        """
        env = {
            "HTTP_PORT": "1", "HTTPS_PORT": "2", "METRICS_PORT": "3", "BIND": "::1",
            "SOCKET": "/s.sock", "STATE_DIR": "/state", "ACME_DIRECTORY": "https://acme/dir",
            "ACME_EMAIL": "e@x", "ACME_CA_BUNDLE": "/ca.pem", "DEBUG": "1",
            "HTTP_HEADER_TIMEOUT": "2s", "HTTP_IDLE_TIMEOUT": "1m30s",
            "CLUSTER": "redis://r:6379/0", "CLUSTER_CA_BUNDLE": "/r.pem", "CLUSTER_NODE": "n1",
            "HTTP3": "true", "WORKERS": "3",
        }
        self.assertEqual({spec.env for spec in SERVER_OPTIONS}, set(env))
        config = resolve_config({}, env)
        self.assertEqual(
            config,
            ServerConfig(http_port=1, https_port=2, metrics_port=3, bind="::1",
                         socket="/s.sock", state_dir="/state",
                         acme_directory="https://acme/dir", acme_email="e@x",
                         acme_ca_bundle="/ca.pem", http_header_timeout=2.0,
                         http_idle_timeout=90.0, cluster="redis://r:6379/0",
                         cluster_ca_bundle="/r.pem", cluster_node="n1", http3=True,
                         debug=True, workers=3),
        )

    def test_http_timeouts(self) -> None:
        """
        C{--http-header-timeout} (30 s) and C{--http-idle-timeout} (75 s) are
        durations; a bad value in the environment is an error.
        """
        config = resolve_config({}, {})
        self.assertEqual((config.http_header_timeout, config.http_idle_timeout), (30.0, 75.0))
        config = resolve_config({"http_header_timeout": 0.5}, {"HTTP_HEADER_TIMEOUT": "9"})
        self.assertEqual(config.http_header_timeout, 0.5)
        config = resolve_config({}, {"MPROXY_HTTP_IDLE_TIMEOUT": "500ms"})
        self.assertEqual(config.http_idle_timeout, 0.5)
        self.assertRaises(InvalidOptions, resolve_config, {}, {"HTTP_HEADER_TIMEOUT": "soon"})


class PathTests(SynchronousTestCase):
    def test_socket_order(self) -> None:
        """
        Socket: flag, then C{$MPROXY_SOCKET}, then C{$XDG_RUNTIME_DIR/mproxy.sock},
        then C{/tmp/mproxy.sock}.
        """
        env = {"MPROXY_SOCKET": "/env/m.sock", "XDG_RUNTIME_DIR": "/run/user/1000"}
        self.assertEqual(socket_path("/flag.sock", env), "/flag.sock")
        self.assertEqual(socket_path("", env), "/env/m.sock")
        self.assertEqual(socket_path("", {"XDG_RUNTIME_DIR": "/run/user/1000"}),
                         "/run/user/1000/mproxy.sock")
        self.assertEqual(socket_path("", {"XDG_RUNTIME_DIR": ""}), "/tmp/mproxy.sock")
        self.assertEqual(socket_path("", {}), "/tmp/mproxy.sock")

    def test_state_dir_order(self) -> None:
        """
        State directory: flag, then C{$MPROXY_STATE_DIR}, then
        C{$XDG_CONFIG_HOME/mproxy}, then C{~/.config/mproxy}.
        """
        env = {"MPROXY_STATE_DIR": "/env/state", "XDG_CONFIG_HOME": "/home/u/.cfg"}
        self.assertEqual(state_dir("/flag", env), "/flag")
        self.assertEqual(state_dir("", env), "/env/state")
        self.assertEqual(state_dir("", {"XDG_CONFIG_HOME": "/home/u/.cfg"}),
                         "/home/u/.cfg/mproxy")
        self.assertEqual(state_dir("", {}), os.path.join(HOME, ".config", "mproxy"))

    def test_resolved_config_paths(self) -> None:
        """
        The resolved configuration applies the same orders, flags first.
        """
        env = {"MPROXY_SOCKET": "/env/m.sock", "XDG_CONFIG_HOME": "/cfg"}
        config = resolve_config({}, env)
        self.assertEqual((config.socket, config.state_dir), ("/env/m.sock", "/cfg/mproxy"))
        config = resolve_config({"socket": "/f.sock", "state_dir": "/f"}, env)
        self.assertEqual((config.socket, config.state_dir), ("/f.sock", "/f"))
        config = resolve_config({}, {"XDG_RUNTIME_DIR": "/run/u"})
        self.assertEqual(config.socket, "/run/u/mproxy.sock")

    def test_client_and_server_agree(self) -> None:
        """
        The client (no flag) resolves the socket the server listens on, for
        every environment variable the server honours.
        """
        for env in ({"MPROXY_SOCKET": "/a.sock"}, {"SOCKET": "/b.sock"},
                    {"XDG_RUNTIME_DIR": "/run/u"}, {}):
            self.assertEqual(socket_path("", env), resolve_config({}, env).socket, env)


class RunFlagsTests(SynchronousTestCase):
    def test_run_flags(self) -> None:
        """
        C{mproxy run} parses every server option; unset flags stay C{None} so
        that the environment can fill them.
        """
        ns = parsing.run_command().parse([])
        for spec in SERVER_OPTIONS:
            self.assertIsNone(getattr(ns, spec.attr), spec.name)
        ns = parsing.run_command().parse(
            ["--http-port", "8080", "--https-port=8443", "--debug", "--bind", "127.0.0.1",
             "--socket", "/s", "--state-dir", "/d"]
        )
        config = resolve_config(vars(ns), {"HTTP_PORT": "1"})
        self.assertEqual((config.http_port, config.https_port, config.debug, config.bind,
                          config.socket, config.state_dir),
                         (8080, 8443, True, "127.0.0.1", "/s", "/d"))
        ns = parsing.run_command().parse(["--debug=false"])
        self.assertFalse(resolve_config(vars(ns), {"DEBUG": "1"}).debug)
