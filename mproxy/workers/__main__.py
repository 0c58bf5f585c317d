"""
C{python -m mproxy.workers SETTINGS_JSON}: one worker process (started by
the supervisor, L{mproxy.workers.pool}).
"""

from mproxy import collector

collector.pause()  # until it has imported and built what it serves (main)

from mproxy.workers.worker import main  # noqa: E402

main()
