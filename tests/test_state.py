"""
Tests for L{mproxy.state}: the typed service records and their JSON form,
atomic writes and careful loading.
"""

from __future__ import annotations

import json
import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from mproxy.errors import InvalidOptions, StateError
from mproxy.service import PauseState, RolloutSplit
from mproxy.spec import HealthCheckConfig, ServiceOptions, TargetOptions
from mproxy.state import STATE_FILENAME, PauseRecord, ServiceRecord, Slot, StateStore

RECORDS = [
    ServiceRecord("api", ServiceOptions(hosts=["api.example.com"]), TargetOptions(),
                  Slot(["aa:1"], ["rr:1"]), rollout=Slot(["cc:1"]),
                  split=RolloutSplit(10, ("vip",)),
                  pause=PauseRecord(PauseState.STOPPED, 12.0, "back soon")),
    ServiceRecord("web", ServiceOptions(), TargetOptions(
        health_check=HealthCheckConfig(path="/hc")), Slot(["bb:2"])),
]
JSON = [r.to_json() for r in RECORDS]


class ServiceRecordTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """
        A record survives its JSON form, every field included.
        """
        for r in RECORDS:
            self.assertEqual(ServiceRecord.from_json(json.loads(json.dumps(r.to_json()))), r)

    def test_retry_timeout_kept(self) -> None:
        """
        The retry timeout is stored with the target options.
        """
        r = ServiceRecord("web", ServiceOptions(), TargetOptions(retry_timeout=10.0),
                          Slot(["aa:1"]))
        data = json.loads(json.dumps(r.to_json()))
        self.assertEqual(data["target_options"]["retry_timeout"], 10.0)
        self.assertEqual(ServiceRecord.from_json(data).target_options.retry_timeout, 10.0)

    def test_format(self) -> None:
        """
        The JSON keys are those of the state file.
        """
        self.assertEqual(
            JSON[0],
            {
                "name": "api",
                "options": JSON[0]["options"],
                "target_options": JSON[0]["target_options"],
                "active_targets": ["aa:1"],
                "active_readers": ["rr:1"],
                "rollout_targets": ["cc:1"],
                "rollout_readers": [],
                "pause": {"state": 2, "stop_message": "back soon", "max_pause": 12.0},
                "rollout_split": {"percentage": 10, "allowlist": ["vip"]},
            },
        )
        self.assertIsNone(JSON[1]["rollout_targets"])
        self.assertIsNone(JSON[1]["rollout_split"])

    def test_defaults(self) -> None:
        """
        A minimal record (a name and active targets) takes defaults.
        """
        r = ServiceRecord.from_json({"name": "web", "active_targets": ["aa:1"]})
        self.assertEqual(r, ServiceRecord("web", ServiceOptions(), TargetOptions(),
                                          Slot(["aa:1"])))

    def test_invalid(self) -> None:
        """
        An invalid record is L{InvalidOptions} naming the service.
        """
        for data in [
            {"name": "web"},
            {"name": "web", "active_targets": ["bad target!"]},
            {"name": "web", "active_targets": ["aa:1"], "options": ["x"]},
            {"name": "web", "active_targets": ["aa:1"], "pause": {"state": 9}},
        ]:
            with self.assertRaises(InvalidOptions, msg=data) as cm:
                ServiceRecord.from_json(data)
            self.assertTrue(str(cm.exception).startswith("service 'web': "), str(cm.exception))


class StateStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.path = os.path.join(self.dir, STATE_FILENAME)
        self.store = StateStore(self.path)

    def write(self, content: bytes) -> None:
        os.makedirs(self.dir, exist_ok=True)
        with open(self.path, "wb") as f:
            f.write(content)

    def test_missing(self) -> None:
        """
        Loading a file that does not exist gives C{None}.
        """
        self.assertIsNone(self.store.load())
        self.assertFalse(os.path.exists(self.dir))

    def test_round_trip(self) -> None:
        """
        What is saved loads back.
        """
        self.store.save(RECORDS)
        self.assertEqual(self.store.load(), RECORDS)
        self.store.save([])
        self.assertEqual(self.store.load(), [])

    def test_creates_directory(self) -> None:
        """
        The state directory is created, private to the user.
        """
        self.store.save(RECORDS)
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)

    def test_mode_and_no_temp_files(self) -> None:
        """
        The file is mode 0600 and no temporary file is left behind, also when
        replacing an existing file.
        """
        self.store.save(RECORDS)
        self.store.save(RECORDS[:1])
        self.assertEqual(os.listdir(self.dir), [STATE_FILENAME])
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(self.store.load(), RECORDS[:1])

    def test_replaced_atomically(self) -> None:
        """
        Saving replaces the file by rename: a reader holding the old file
        still sees complete old content.
        """
        self.store.save(RECORDS)
        with open(self.path, "rb") as old:
            self.store.save([])
            self.assertEqual(json.loads(old.read())["services"], JSON)
        self.assertEqual(self.store.load(), [])

    def test_failed_write_leaves_old_file(self) -> None:
        """
        A save that fails leaves the old file and no temporary file.
        """
        self.store.save(RECORDS)
        with open(self.path, "rb") as f:
            before = f.read()
        bad = ServiceRecord("x", ServiceOptions(), TargetOptions(), Slot([object()]))
        self.assertRaises(TypeError, self.store.save, [bad])
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(os.listdir(self.dir), [STATE_FILENAME])

    def test_format(self) -> None:
        """
        The file is a versioned JSON object ending in a newline.
        """
        self.store.save(RECORDS)
        with open(self.path, "rb") as f:
            raw = f.read()
        self.assertTrue(raw.endswith(b"\n"))
        data = json.loads(raw)
        self.assertEqual(data["version"], 1)
        self.assertEqual(data["services"], JSON)

    def test_legacy_list(self) -> None:
        """
        A bare JSON list of services (kamal-proxy's format) loads.
        """
        self.write(json.dumps(JSON).encode())
        self.assertEqual(self.store.load(), RECORDS)

    def assert_error(self, content: bytes, text: str) -> None:
        self.write(content)
        with self.assertRaises(StateError) as cm:
            self.store.load()
        self.assertIn(self.path, str(cm.exception))
        self.assertIn(text, str(cm.exception))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), content)

    def test_garbage(self) -> None:
        """
        Garbage is a L{StateError} naming the file, which is left untouched.
        """
        self.assert_error(b"\x00\x01garbage", "corrupt")
        self.assert_error(b"{truncated", "corrupt")
        self.assert_error(b"\xff\xfe\xfd", "corrupt")
        self.assert_error(b"", "corrupt")
        self.assert_error(b"42", "corrupt")
        self.assert_error(b'{"services": 3}', "corrupt")
        self.assert_error(b'[1, 2]', "bad service record")
        self.assert_error(b'[{"name": 5}]', "bad service record")

    def test_future_version(self) -> None:
        """
        A file from a newer version is refused rather than misread.
        """
        self.assert_error(b'{"version": 99, "services": []}', "unsupported version")
        self.assert_error(b'{"version": "1", "services": []}', "unsupported version")

    def test_invalid_record(self) -> None:
        """
        One invalid record refuses the whole file, naming it and the service.
        """
        self.assert_error(
            json.dumps({"services": JSON + [{"name": "bad", "active_targets": []}]}).encode(),
            "is invalid: service 'bad': no active targets",
        )

    def test_unreadable(self) -> None:
        """
        A path that cannot be read is a L{StateError} naming it.
        """
        os.makedirs(self.path)
        with self.assertRaises(StateError) as cm:
            self.store.load()
        self.assertIn(self.path, str(cm.exception))
        self.assertIn("cannot read", str(cm.exception))
