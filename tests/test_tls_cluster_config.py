"""
The C{--cluster} server options (L{mproxy.config}).
"""

from twisted.trial.unittest import SynchronousTestCase

from mproxy.config import parse_cluster_url, resolve_config
from mproxy.errors import InvalidOptions


class ClusterOptionTests(SynchronousTestCase):
    def test_urls(self) -> None:
        """
        redis:// and rediss:// URLs with optional credentials and database
        are accepted; other schemes, missing hosts, bad ports and databases
        are refused.
        """
        for good in ["redis://127.0.0.1:6379/0", "rediss://u:p@redis.internal:6380/2", "redis://h"]:
            self.assertEqual(parse_cluster_url(good), good)
        self.assertEqual(parse_cluster_url(""), "")
        for bad in ["http://h:1/0", "redis://", "redis://h:x/0", "redis://h:1/zero"]:
            self.assertRaises(ValueError, parse_cluster_url, bad)

    def test_environment(self) -> None:
        """
        C{MPROXY_CLUSTER}, C{MPROXY_CLUSTER_CA_BUNDLE} and
        C{MPROXY_CLUSTER_NODE} set the options; a bad URL is an error.
        """
        config = resolve_config(
            {},
            {
                "MPROXY_CLUSTER": "rediss://:pw@10.0.0.5:6379/1",
                "MPROXY_CLUSTER_CA_BUNDLE": "/etc/redis-ca.pem",
                "MPROXY_CLUSTER_NODE": "web-1",
            },
        )
        self.assertEqual(
            (config.cluster, config.cluster_ca_bundle, config.cluster_node),
            ("rediss://:pw@10.0.0.5:6379/1", "/etc/redis-ca.pem", "web-1"),
        )
        self.assertEqual(resolve_config({}, {}).cluster, "")
        self.assertRaises(InvalidOptions, resolve_config, {}, {"MPROXY_CLUSTER": "memcached://x"})
