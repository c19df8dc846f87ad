"""``--workers N``: a master process that owns the sockets, N workers that serve.

The master
* binds every listener once per worker number with ``SO_REUSEPORT`` (the
  kernel then spreads new connections evenly over the N sockets; one shared
  socket would pile them onto whichever worker wakes first, as libuv does not
  use EPOLLEXCLUSIVE) and keeps those sockets open for its whole life;
* starts worker k (``fastlb.runtime.worker``) on the sockets of number k and
  does no request work itself;
* runs the health checks, once per backend whatever N is, and writes what
  its checkers decide into the shared table (``fastlb.runtime.sharedhealth``);
  workers report the failures they see on traffic to it, so that a backend
  failing on one worker is ejected on all;
* restarts a worker that dies, on the same sockets, at once; one that keeps
  dying young is restarted with a growing back-off, and the master says so;
* folds the counters of a worker that is gone into the table's retired slot;
* on SIGHUP checks the configuration file again and, if it is valid, starts a
  new generation of workers on the same sockets (for kept listeners: nothing
  queued in the kernel is lost), and once they serve, drains the old one
  (SIGTERM: stop accepting, finish in flight with ``Connection: close``, up
  to ``drain_timeout``). A listener the reload removed is closed once its old
  workers are gone;
* on SIGTERM or SIGINT drains every worker, then exits 0; a second one makes
  the workers stop at once.
"""
import asyncio
import logging
import os
import pickle
import signal
import subprocess
import sys
import time

from fastlb.runtime import build
from fastlb.server import _fmt
from fastlb.runtime.sharedhealth import PUBLISH, MasterHealth, decode, report_socket
from fastlb.runtime.shm import Layout, TableFull, Tables

__all__ = ["Master", "run_master"]

log = logging.getLogger("fastlb")

YOUNG = 10.0            # a worker that dies within this many seconds of its start died young
BACKOFF_FIRST = 0.5     # the second young death in a row waits this long, doubling...
BACKOFF_MAX = 30.0      # ... up to this
READY_TIMEOUT = 30.0    # a new generation must be serving within this, or the reload fails
REAP_EVERY = 0.2        # seconds between looks for exited workers (the event loop keeps SIGCHLD)
STOP_GRACE = 5.0        # after drain_timeout: workers still running are killed


def _close_sets(sockets):
    """Close every socket of ``sockets`` (listener name -> [[socket, ...] per worker])."""
    for sets in sockets.values():
        for socks in sets:
            for s in socks:
                s.close()


def _exit_words(status):
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by signal {name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


class _Worker:
    __slots__ = ("number", "slot", "gen", "proc", "pid", "started", "ready", "stopping",
                 "status")

    def __init__(self, number, slot, gen, proc):
        self.number = number    # which sockets it serves (0..N-1)
        self.slot = slot        # its counter slot in the table
        self.gen = gen          # its _Generation
        self.proc = proc
        self.pid = proc.pid
        self.started = time.monotonic()
        self.ready = False
        self.stopping = False   # told to drain (or stop)
        self.status = None      # wait status once exited


class _Generation:
    """The workers of one configuration."""

    def __init__(self, number, config, rows, listener_rows):
        self.number = number
        self.config = config
        self.rows = rows
        self.listener_rows = listener_rows
        self.workers = {}       # worker number -> _Worker (the live one)
        self.ready = None       # future: every worker has said it serves


class Master:
    def __init__(self, config, n, load_config=None, loop=None):
        self.config = config
        self.n = n
        self.load_config = load_config
        self.loop = loop or asyncio.get_running_loop()
        self.tables = None
        self.layout = None
        self.sockets = {}       # listener name -> [[socket, ...] per worker number]
        self.binds = {}         # listener name -> (host, port) its sockets are bound to
        self.shadow = None      # a Proxy that never serves: the pools the checkers steer
        self.health = None
        self.gen = None         # the current generation
        self.old = []           # generations draining
        self.workers = {}       # pid -> _Worker, every live one
        self.gens = 0
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.reloads = 0
        self.last_reload = None  # (time, result words)
        self.stopping = False
        self._free_slots = []
        self._deaths = {}       # worker number -> young deaths in a row
        self._pending = {}      # worker number -> TimerHandle of a delayed restart
        self._report_r = None
        self._report_w = None
        self._timers = []
        self._reloading = None
        self._again = False
        self._closing_socks = []    # (generation, {name: sockets}) closed once it is gone
        from fastlb.runtime.control import MasterController

        self.controller = MasterController(self)

    # ---------------------------------------------------------------- sockets

    def _bind_listener(self, lc):
        """One set of SO_REUSEPORT sockets per worker number, all on one port."""
        from fastlb.server import _bind

        sets = []
        try:
            first = _bind(lc, reuseport=True)
            sets.append(first)
            port = first[0].getsockname()[1]
            for _ in range(1, self.n):
                sets.append(_bind(lc, reuseport=True, port=port))
        except BaseException:
            for socks in sets:
                for s in socks:
                    s.close()
            raise
        return sets

    # ---------------------------------------------------------------- start and stop

    async def start(self):
        config = self.config
        self.tables = Tables.create(*Layout.capacity(config, self.n), shared=True)
        self.layout = Layout(self.tables)
        self._free_slots = list(range(self.tables.slots - 1, 0, -1))
        rows, lrows = self.layout.assign(config)
        for name, lc in config.listeners.items():
            try:
                self.sockets[name] = self._bind_listener(lc)
            except BaseException:
                self._close_all_sockets()
                raise
            self.binds[name] = (lc.host, lc.port)
        self._report_r, self._report_w = report_socket()
        self.loop.add_reader(self._report_r.fileno(), self._on_report)
        from fastlb.proxy import Proxy

        self.shadow = Proxy(self._quiet(config), self.loop)
        self.health = MasterHealth(self.tables)
        self.health.use(self.shadow.pools, rows)
        self.shadow.start_health()
        self.health.publish()
        self._every(PUBLISH, self.health.publish)
        self._every(REAP_EVERY, self._reap)
        gen = self._new_generation(config, rows, lrows)
        self.gen = gen
        try:
            await self._wait_ready(gen, startup=True)
        except BaseException:
            await self._kill_generation(gen)
            raise

    @staticmethod
    def _quiet(config):
        """The configuration of the master's own pools: they carry no traffic,
        so they log none (each worker opens the access log itself)."""
        import dataclasses

        return dataclasses.replace(config, access_log="off")

    def _every(self, interval, fn):
        def tick():
            try:
                fn()
            except Exception:
                log.exception("master: %s failed", getattr(fn, "__name__", fn))
            self._timers[i] = self.loop.call_later(interval, tick)

        i = len(self._timers)
        self._timers.append(self.loop.call_later(interval, tick))

    def _close_all_sockets(self):
        _close_sets(self.sockets)
        self.sockets = {}

    async def stop(self, timeout, now):
        """Drain every worker (up to ``timeout`` seconds, less if ``now`` is
        set: then they are told to stop at once), then close everything."""
        self.stopping = True
        for h in self._pending.values():
            h.cancel()
        self._pending.clear()
        live = list(self.workers.values())
        for w in live:
            self._signal(w, signal.SIGTERM)
        deadline = self.loop.time() + timeout + STOP_GRACE
        told_again = False
        while self.workers and self.loop.time() < deadline:
            if now.done() and not told_again:
                told_again = True
                for w in list(self.workers.values()):
                    self._signal(w, signal.SIGTERM, again=True)
            self._reap()
            await asyncio.sleep(0.05)
        for w in list(self.workers.values()):
            log.warning("worker %d (pid %d) did not stop in time: killed", w.number, w.pid)
            self._signal(w, signal.SIGKILL)
        end = self.loop.time() + 5
        while self.workers and self.loop.time() < end:
            self._reap()
            await asyncio.sleep(0.02)
        self.close()

    def close(self):
        for t in self._timers:
            t.cancel()
        self._timers = []
        if self._report_r is not None:
            self.loop.remove_reader(self._report_r.fileno())
            self._report_r.close()
            self._report_w.close()
            self._report_r = None
        if self.shadow is not None:
            self.shadow.close()
        self._close_all_sockets()
        for _, socks in self._closing_socks:
            for s in socks:
                s.close()
        self._closing_socks = []

    async def wait_closed(self):
        if self.shadow is not None:
            await self.shadow.wait_closed()

    # ---------------------------------------------------------------- workers

    def _take_slot(self):
        if not self._free_slots:
            return None
        return self._free_slots.pop()

    def _new_generation(self, config, rows, lrows):
        self.gens += 1
        gen = _Generation(self.gens, config, rows, lrows)
        gen.ready = self.loop.create_future()
        try:
            for k in range(self.n):
                self._spawn(gen, k)
        except BaseException:
            for w in gen.workers.values():
                w.stopping = True
                self._signal(w, signal.SIGKILL)
            raise
        return gen

    def _spawn(self, gen, k):
        slot = self._take_slot()
        if slot is None:
            raise RuntimeError("no counter slot free (too many workers still draining)")
        socks = {name: [s.fileno() for s in self.sockets[name][k]]
                 for name in gen.config.listeners}
        job = {
            "config": gen.config, "index": k, "slot": slot, "gen": gen.number,
            "rows": gen.rows, "listener_rows": gen.listener_rows, "sockets": socks,
            "tables_fd": self.tables.fd, "report_fd": self._report_w.fileno(),
            "master": os.getpid(),
        }
        memfd = os.memfd_create("fastlb-worker", 0)
        try:
            os.write(memfd, pickle.dumps(job, pickle.HIGHEST_PROTOCOL))
            os.lseek(memfd, 0, os.SEEK_SET)
            fds = [memfd, self.tables.fd, self._report_w.fileno()]
            fds += [fd for fdl in socks.values() for fd in fdl]
            proc = subprocess.Popen([sys.executable, "-m", "fastlb.runtime.worker", str(memfd)],
                                    pass_fds=fds, stdin=subprocess.DEVNULL, close_fds=True,
                                    process_group=0)  # Ctrl-C reaches the master alone
        except BaseException:
            self._free_slots.append(slot)
            raise
        finally:
            os.close(memfd)
        w = _Worker(k, slot, gen, proc)
        gen.workers[k] = w
        self.workers[w.pid] = w
        log.debug("worker %d started (pid %d, generation %d)", k, w.pid, gen.number)
        return w

    async def _wait_ready(self, gen, startup=False):
        try:
            await asyncio.wait_for(asyncio.shield(gen.ready), READY_TIMEOUT)
        except asyncio.TimeoutError:
            raise RuntimeError(f"workers did not start within {READY_TIMEOUT:g}s") from None

    def _on_report(self):
        while True:
            try:
                data = self._report_r.recv(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            kind, fields = decode(data)
            if kind in ("F", "S"):
                self.health.report(kind, fields)
            elif kind == "R" and len(fields) >= 3:
                self._on_ready(fields)

    def _on_ready(self, fields):
        try:
            pid = int(fields[2])
        except ValueError:
            return
        w = self.workers.get(pid)
        if w is None:
            return
        w.ready = True
        gen = w.gen
        if not gen.ready.done() and all(
                x.ready for x in gen.workers.values()) and len(gen.workers) == self.n:
            gen.ready.set_result(None)

    def _signal(self, w, sig, again=False):
        if w.status is not None:
            return
        if sig == signal.SIGTERM and w.stopping and not again:
            return
        if sig == signal.SIGTERM:
            w.stopping = True
        try:
            os.kill(w.pid, sig)
        except ProcessLookupError:
            pass

    def _reap(self):
        for pid, w in list(self.workers.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            w.status = status
            w.proc.returncode = (-os.WTERMSIG(status) if os.WIFSIGNALED(status)
                                 else os.WEXITSTATUS(status))
            del self.workers[pid]
            self._exited(w)

    def _exited(self, w):
        # nobody writes its slot now: its totals go to the retired slot
        self.tables.fold(w.slot)
        self._free_slots.append(w.slot)
        gen = w.gen
        if gen.workers.get(w.number) is w:
            del gen.workers[w.number]
        if w.stopping or self.stopping:
            log.debug("worker %d (pid %d) %s", w.number, w.pid, _exit_words(w.status))
            if gen in self.old and not gen.workers:
                self._generation_gone(gen)
            return
        if gen is not self.gen and gen in self.old:
            # an old generation's worker, died while draining
            log.warning("worker %d (pid %d, previous configuration) %s", w.number, w.pid,
                        _exit_words(w.status))
            if not gen.workers:
                self._generation_gone(gen)
            return
        if not gen.ready.done():
            # the generation never came up: its start (or the reload) fails
            gen.ready.set_exception(RuntimeError(
                f"worker {w.number} (pid {w.pid}) {_exit_words(w.status)} before serving"))
            gen.ready.exception()       # retrieved by whoever waits; no warning if nobody
            return
        lived = time.monotonic() - w.started
        deaths = self._deaths.get(w.number, 0) + 1 if lived < YOUNG else 1
        self._deaths[w.number] = deaths
        if deaths <= 1:
            log.warning("worker %d (pid %d) %s: restarting it", w.number, w.pid,
                        _exit_words(w.status))
            self._restart(w.number)
        else:
            delay = min(BACKOFF_FIRST * 2 ** (deaths - 2), BACKOFF_MAX)
            log.warning("worker %d (pid %d) %s, %d times in a row within %gs of starting: "
                        "restarting it in %gs", w.number, w.pid, _exit_words(w.status),
                        deaths, YOUNG, delay)
            self._pending[w.number] = self.loop.call_later(delay, self._restart, w.number)

    def _restart(self, k):
        self._pending.pop(k, None)
        if self.stopping or self.gen is None or k in self.gen.workers:
            return
        try:
            w = self._spawn(self.gen, k)
        except Exception as e:
            log.error("worker %d cannot be restarted: %s; trying again in %gs", k, e,
                      BACKOFF_MAX)
            self._pending[k] = self.loop.call_later(BACKOFF_MAX, self._restart, k)
            return
        w.ready = False     # it says so when it serves; nothing waits for it

    def _generation_gone(self, gen):
        if gen in self.old:
            self.old.remove(gen)
        keep = []
        for g, socks in self._closing_socks:
            if g is gen:
                for s in socks:
                    s.close()
            else:
                keep.append((g, socks))
        self._closing_socks = keep
        log.info("the workers of the previous configuration (generation %d) are done",
                 gen.number)

    async def _kill_generation(self, gen):
        for w in list(gen.workers.values()):
            w.stopping = True
            self._signal(w, signal.SIGKILL)
        end = self.loop.time() + 5
        while gen.workers and self.loop.time() < end:
            self._reap()
            await asyncio.sleep(0.02)

    # ---------------------------------------------------------------- reload

    def on_hup(self):
        if self.load_config is None:
            log.warning("SIGHUP: nothing to reload (reloading needs a configuration file); "
                        "carrying on")
            return
        if self.stopping:
            log.warning("SIGHUP while stopping: not reloading")
            return
        if self.gen is None or not self.gen.ready.done():
            log.warning("SIGHUP while the workers start: not reloading")
            return
        if self._reloading is not None:
            self._again = True
            return
        self._reloading = self.loop.create_task(self._reload())
        self._reloading.add_done_callback(self._reloaded)

    def _reloaded(self, task):
        self._reloading = None
        if self._again:
            self._again = False
            self.on_hup()

    async def _reload(self):
        from fastlb.errors import ConfigError
        from fastlb.server import ListenError

        log.info("SIGHUP: reloading the configuration")
        try:
            config = self.load_config()
        except (ConfigError, OSError) as e:
            self._refused(f"\n{e}" if isinstance(e, ConfigError) else f" {e}")
            return
        try:
            await self.controller.reload_base(config)
        except ListenError as e:
            self._refused(f" cannot listen on {e.bind} (listener {e.listener}): {e.strerror}")
        except (TableFull, RuntimeError) as e:
            self._refused(f" {e}")
        except Exception:
            log.exception("reload failed")
            self.last_reload = (time.time(), "failed")

    def _refused(self, why):
        log.error("reload refused, the running configuration is unchanged:%s", why)
        self.last_reload = (time.time(), "refused")

    async def reload(self, config):
        """Run ``config`` from now on (see the module docstring). Raises
        ListenError, TableFull or RuntimeError, and then nothing changed."""
        old_gen = self.gen
        notes = []
        if config.workers != self.n:
            notes.append(f"workers stays {self.n} (it changes at a restart)")
            import dataclasses

            config = dataclasses.replace(config, workers=self.n)
        # new and moved listeners get their sockets first: if one cannot be
        # bound, nothing has changed
        new_socks = {}
        moved = {}
        try:
            for name, lc in config.listeners.items():
                bound = self.binds.get(name)
                if bound == (lc.host, lc.port):
                    continue
                if bound is not None:
                    moved[name] = self.sockets[name]
                new_socks[name] = self._bind_listener(lc)
        except BaseException:
            _close_sets(new_socks)
            raise
        undo_layout = (dict(self.layout.backends), dict(self.layout.listeners))
        try:
            rows, lrows = self.layout.assign(config)
        except TableFull:
            _close_sets(new_socks)
            raise
        previous = dict(self.sockets)
        self.sockets.update(new_socks)
        for name, lc in config.listeners.items():
            if name not in new_socks:
                for socks in self.sockets[name]:
                    for s in socks:
                        s.listen(lc.backlog)
        gen = None
        try:
            gen = self._new_generation(config, rows, lrows)
            await self._wait_ready(gen)
        except BaseException:
            if gen is not None:
                await self._kill_generation(gen)
            self.sockets = previous
            _close_sets(new_socks)
            self.layout.backends, self.layout.listeners = undo_layout
            raise
        # the new generation serves: the checkers follow the new pools, then
        # the old workers drain
        plan = build.plan(self.shadow, self._quiet(config))
        build.apply(self.shadow, plan)
        build.publish(self.shadow)
        self.shadow.start_health()
        self.health.use(self.shadow.pools, rows)
        self.health.publish()
        self.gen = gen
        self.config = config
        gone = [name for name in previous if name not in config.listeners]
        closing = []
        for name in gone:
            for socks in self.sockets.pop(name):
                closing.extend(socks)
            self.binds.pop(name, None)
        for name, sets in moved.items():
            for socks in sets:
                closing.extend(socks)
        for name, lc in config.listeners.items():
            self.binds[name] = (lc.host, lc.port)
        if old_gen is not None:
            self.old.append(old_gen)
            if closing:
                self._closing_socks.append((old_gen, closing))
            for w in list(old_gen.workers.values()):
                self._signal(w, signal.SIGTERM)
            if not old_gen.workers:
                self._generation_gone(old_gen)
        else:
            for s in closing:
                s.close()
        for name in new_socks:
            log.info("listener %s listening on %s", name,
                     ", ".join(_fmt(s.getsockname()) for s in self.sockets[name][0]))
        self.reloads += 1
        summary = plan.summary()
        if notes:
            summary = "; ".join([summary] + notes) if plan.changes else "; ".join(notes)
        self.last_reload = (time.time(), "ok")
        if self.config.source is not None:
            logging.getLogger().setLevel(config.log_level.upper())
        log.info("reloaded (%s): %s; generation %d serves, generation %d drains",
                 config.summary(), summary, gen.number,
                 old_gen.number if old_gen is not None else 0)
        return summary


async def run_master(config, ready=None, load_config=None, etcd_config=None):
    """``fastlb serve`` with ``config.workers`` > 1: run the master until
    SIGTERM or SIGINT, then drain every worker. ``ready(master)`` is called
    once every worker serves and the signal handlers are in place.
    Discovery (and ``etcd_config``, see ``fastlb.server.serve``) runs here,
    once, never in the workers: each set it finds is a new generation."""
    from fastlb.runtime.discovery import Discovery
    from fastlb.server import log_listening

    loop = asyncio.get_running_loop()
    base = config
    runner = Discovery(etcd_config)     # idle until a pool has discovery
    config = await runner.prime(config)
    master = Master(config, config.workers, load_config, loop)
    stop = loop.create_future()
    now = loop.create_future()
    signals = []
    admin = None

    def on_stop(signame):
        if not stop.done():
            stop.set_result(signame)
        elif not now.done():
            log.warning("%s again: stopping the workers now", signame)
            now.set_result(None)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop, sig.name)
        signals.append(sig)
    loop.add_signal_handler(signal.SIGHUP, master.on_hup)
    signals.append(signal.SIGHUP)
    try:
        try:
            await master.start()
        except BaseException:
            master.close()
            raise
        if runner is not None:
            master.controller.base = base
            runner.attach(master.controller)
        log_listening(config, {name: sets[0] for name, sets in master.sockets.items()},
                      workers=master.n)
        if config.admin is not None:
            from fastlb.observe.admin import start_admin
            from fastlb.observe.sources import MasterSource
            from fastlb.server import ListenError, _AdminPlace

            try:
                admin = await start_admin(MasterSource(master), config.admin)
            except OSError as e:
                await master.stop(0, now)
                raise ListenError(_AdminPlace(config.admin), e) from None
        log.info("master (pid %d): %d workers serving (pids %s)", os.getpid(), master.n,
                 ", ".join(str(w.pid) for w in master.gen.workers.values()))
        if ready is not None:
            ready(master)
        signame = await stop
        if runner is not None:
            await runner.stop()
            runner = None
        if master._reloading is not None:
            try:
                await master._reloading
            except Exception:
                pass
        timeout = master.config.drain_timeout
        log.info("%s: draining %d workers, up to %gs (send %s again to stop now)", signame,
                 len(master.workers), timeout, signame)
        await master.stop(timeout, now)
        log.info("every worker stopped; exiting")
    finally:
        if runner is not None:
            await runner.stop()
        if admin is not None:
            admin.close()
        for sig in signals:
            loop.remove_signal_handler(sig)
        master.close()
        await master.wait_closed()
    return master
