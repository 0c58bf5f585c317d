"""
C{python -m mproxy ...} is the same as the C{mproxy} console script.
"""

from mproxy.cli.main import run

run()
