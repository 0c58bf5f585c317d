"""
Supervisor and worker processes: with C{--workers N} the process that
C{mproxy run} (or C{twistd mproxy}) starts is a supervisor that owns the
listening sockets, the control socket, the state file, health checks,
certificates and metrics, and N worker processes serve HTTP and HTTPS from
the listening sockets they inherit.

  - L{mproxy.workers.commands}: the AMP commands of the channel between the
    supervisor and each worker (one module, both sides);
  - L{mproxy.workers.interfaces}: L{IDataPlane}, what the controller drives
    (L{mproxy.workers.local.LocalDataPlane} in one process,
    L{mproxy.workers.pool.WorkerPool} with workers);
  - L{mproxy.workers.worker}: the worker process (C{python -m mproxy.workers});
  - L{mproxy.workers.sockets}: the supervisor's listening sockets, bound
    without accepting.
"""
