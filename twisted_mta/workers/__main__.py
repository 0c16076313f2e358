"""``python -m twisted_mta.workers``: one worker process, as the main
process spawns it (see :mod:`twisted_mta.workers.supervisor`)."""

from twisted_mta.workers.worker import main

main()
