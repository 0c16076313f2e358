"""Serving SMTP from several processes: ``[limits] workers``.

The main process binds every listener, then spawns the workers and passes
them the listening sockets; each worker accepts on all of them, runs the
SMTP sessions and writes what they accept.  The queue, the relay, the
maildrop, the bounces and the metrics stay in the main process, which
talks to each worker over a socket pair, with AMP (``commands``):

* ``supervisor``: the main process's side: spawning and restarting the
  workers, answering them, their log lines;
* ``ledger``: the connection slots of all workers, against the limits;
* ``worker``: a worker's side of the channel;
* ``leases``: the connection slots as a worker holds them.
"""
