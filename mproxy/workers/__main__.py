"""
C{python -m mproxy.workers SETTINGS_JSON}: one worker process (started by
the supervisor, L{mproxy.workers.pool}).
"""

from mproxy.workers.worker import main

main()
