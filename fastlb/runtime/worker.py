"""A worker process: the data path on the sockets its master made.

Started by the master as ``python -m fastlb.runtime.worker FD``, where FD
is a memfd holding what the worker needs (pickled): the configuration, its
worker number and counter slot, the table's rows, and the numbers of the
inherited fds (listening sockets per listener, the shared table, the
report socket). It serves until SIGTERM (or SIGINT) and then drains as a
single process does; a second SIGTERM stops it at once. If the master dies
the kernel sends the worker SIGTERM (``PR_SET_PDEATHSIG``).
"""
import ctypes
import logging
import os
import pickle
import signal
import socket
import sys

__all__ = ["main", "Shared"]

_PR_SET_PDEATHSIG = 1


class FixedLayout:
    """The rows the master gave this worker's configuration (a worker never reloads)."""

    def __init__(self, backends, listeners):
        self.backends = backends
        self.listeners = listeners

    def assign(self, config):
        return dict(self.backends), dict(self.listeners)


class Shared:
    """What a worker's Proxy is given (``Proxy.shared``): the table, the
    rows, this worker's slot, and the factory of the pools' health views."""

    def __init__(self, tables, layout, slot, report, loop_ref):
        self.tables = tables
        self.layout = layout
        self.slot = slot
        self.report = report
        self._loop = loop_ref

    def health(self, proxy, pool, config):
        from fastlb.runtime.sharedhealth import WorkerHealth

        return WorkerHealth(pool, config, self.tables, self.layout.backends, self.report,
                            proxy.loop)


def _die_with_parent(master):
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != master:      # the master died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    fd = int(argv[0])
    with os.fdopen(fd, "rb") as f:
        job = pickle.load(f)
    config = job["config"]
    index = job["index"]
    logging.basicConfig(level=config.log_level.upper(),
                        format=f"fastlb: worker {index}: %(message)s", stream=sys.stderr)
    log = logging.getLogger("fastlb")
    _die_with_parent(job["master"])

    from fastlb import server
    from fastlb.runtime.sharedhealth import POLL, encode
    from fastlb.runtime.shm import Tables

    tables = Tables.attach(job["tables_fd"])
    report = socket.socket(fileno=job["report_fd"])
    report.setblocking(False)
    sockets = {name: [socket.socket(fileno=n) for n in fds]
               for name, fds in job["sockets"].items()}
    shared = Shared(tables, FixedLayout(job["rows"], job["listener_rows"]), job["slot"],
                    report, None)

    def ready(proxy, listener):
        loop = proxy.loop
        pools = [p for p in proxy.pools.values()]
        seen = [-1]

        def poll():
            if proxy.closed:
                return
            v = tables.version
            if v != seen[0]:
                again = seen[0] == -1
                seen[0] = v
                for pool in pools:
                    h = pool.health
                    if h is not None and hasattr(h, "sync"):
                        h.sync(again)
            loop.call_later(POLL, poll)

        poll()
        try:
            report.send(encode("R", index, job["gen"], os.getpid()))
        except OSError:
            pass

    try:
        server.run(server.serve(config, ready=ready, sockets=sockets, shared=shared))
    except KeyboardInterrupt:
        pass
    except Exception:
        log.exception("worker failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
