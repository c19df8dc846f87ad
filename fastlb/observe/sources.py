"""What the admin listener reads and changes: one process's, or a master's.

Both give ``fastlb.observe.status.collect`` the table, the rows, the pools
(with their health checkers) and the listeners, and carry out the admin
API's changes:

* drain / disable / enable and weight: the pool's checker is told
  (``HealthChecker.set_mode`` / ``set_configured_weight``). In one process
  that steers the selector at once; with workers the master's checkers
  write the table and every worker applies it within ``POLL`` seconds.
* add / remove a backend: the running configuration with that pool's
  backends changed, applied as a reload (with workers: a new generation).
"""
import dataclasses
import logging

from fastlb.config.model import BackendConfig
from fastlb.errors import ConfigError
from fastlb.observe.admin import AdminError
from fastlb.observe.status import process_info
from fastlb.validate import backend_endpoint, format_address, weight_problem

__all__ = ["ProcessSource", "MasterSource"]

log = logging.getLogger("fastlb")


class _Source:
    def _config(self):
        raise NotImplementedError

    def _find(self, pool_name, address):
        pool = next((p for p in self.pools() if p.name == pool_name), None)
        if pool is None:
            raise AdminError(404, f"no pool named {pool_name!r}")
        for i, b in enumerate(pool.backends):
            if b.address == address:
                return pool, i
        raise AdminError(404, f"pool {pool_name} has no backend {address!r} (backends are "
                              "named host:port, as configured)")

    def _answer(self, pool, i):
        snap = pool.health.snapshot()[i] if pool.health is not None else {}
        b = pool.backends[i]
        return {"pool": pool.name, "backend": b.address, "state": snap.get("status", "UP"),
                "weight": snap.get("weight", 1)}

    def set_mode(self, pool_name, address, mode):
        pool, i = self._find(pool_name, address)
        if pool.health is None:
            raise AdminError(409, f"pool {pool_name} has no health state")
        if pool.health.set_mode(i, mode):
            self._changed(pool, i)
        return self._answer(pool, i)

    def set_weight(self, pool_name, address, weight):
        pool, i = self._find(pool_name, address)
        problem = weight_problem(weight)
        if problem is not None or isinstance(weight, bool):
            raise AdminError(400, f"weight: {problem or 'expected a whole number'}", "weight")
        if pool.health is None:
            raise AdminError(409, f"pool {pool_name} has no health state")
        if pool.health.set_configured_weight(i, weight):
            self._changed(pool, i)
        return self._answer(pool, i)

    def _changed(self, pool, i):
        """A backend's admin state changed (subclasses spread it)."""

    async def add_backend(self, pool_name, url, weight):
        config = self._config()
        pc = config.pools.get(pool_name)
        if pc is None:
            raise AdminError(404, f"no pool named {pool_name!r}")
        try:
            scheme, host, port = backend_endpoint(url)
        except ConfigError as e:
            raise AdminError(400, f"url: {e}", "url") from None
        problem = weight_problem(weight)
        if problem is not None or isinstance(weight, bool):
            raise AdminError(400, f"weight: {problem or 'expected a whole number'}", "weight")
        address = format_address(host, port)
        if any(b.address == address for b in pc.backends):
            raise AdminError(409, f"pool {pool_name} already has {address}")
        bc = BackendConfig(url=url, host=host, port=port, weight=weight, scheme=scheme)
        new = self._with_backends(config, pc, pc.backends + (bc,))
        await self._apply(new, f"admin: backend {address} added to pool {pool_name}")
        pool, i = self._find(pool_name, address)
        return self._answer(pool, i)

    async def remove_backend(self, pool_name, address):
        config = self._config()
        pc = config.pools.get(pool_name)
        if pc is None:
            raise AdminError(404, f"no pool named {pool_name!r}")
        keep = tuple(b for b in pc.backends if b.address != address)
        if len(keep) == len(pc.backends):
            raise AdminError(404, f"pool {pool_name} has no backend {address!r}")
        if not keep:
            raise AdminError(409, f"{address} is the last backend of pool {pool_name}")
        new = self._with_backends(config, pc, keep)
        await self._apply(new, f"admin: backend {address} removed from pool {pool_name} "
                               "(its requests in flight finish)")
        return {"pool": pool_name, "backend": address, "state": "REMOVED"}

    @staticmethod
    def _with_backends(config, pc, backends):
        pools = dict(config.pools)
        pools[pc.name] = dataclasses.replace(pc, backends=backends)
        return dataclasses.replace(config, pools=pools)


class ProcessSource(_Source):
    """One process: ``proxy`` and what ``fastlb.server.serve`` knows."""

    def __init__(self, proxy, info, controller):
        self.proxy = proxy
        self.info = info            # has .started, .reloads, .last_reload
        self.controller = controller
        self.tables = proxy.tables

    def rows(self):
        return self.proxy.layout.backends, self.proxy.layout.listeners

    def pools(self):
        return list(self.proxy.pools.values())

    def listeners(self):
        out = []
        for name, front in self.proxy.fronts.items():
            socks = front.listener.sockets if front.listener is not None else []
            out.append((name, front.config.bind, socks))
        return out

    def process(self):
        return process_info(1, self.info.started, self.info.reloads, self.info.last_reload)

    def _config(self):
        return self.controller.config

    def _changed(self, pool, i):
        b = pool.backends[i]
        if pool.health._states[i].mode == "maint":
            b.close_idle()

    async def _apply(self, config, words):
        from fastlb.runtime.shm import TableFull

        try:
            summary = await self.controller.apply(config)
        except (OSError, TableFull) as e:
            raise AdminError(503, f"not applied: {e}") from None
        log.info("%s: %s", words, summary)


class MasterSource(_Source):
    """The master of ``--workers N``: its checkers, its table, its generations."""

    def __init__(self, master):
        self.master = master
        self.tables = master.tables

    def rows(self):
        return self.master.layout.backends, self.master.layout.listeners

    def pools(self):
        return list(self.master.shadow.pools.values())

    def listeners(self):
        m = self.master
        return [(name, lc.bind, m.sockets.get(name, [[]])[0])
                for name, lc in m.config.listeners.items()]

    def process(self):
        m = self.master
        return process_info(m.n, m.started_wall, m.reloads, m.last_reload)

    def _config(self):
        return self.master.config

    def _changed(self, pool, i):
        self.master.health.publish()    # every worker sees it at its next look

    async def _apply(self, config, words):
        from fastlb.runtime.shm import TableFull

        try:
            await self.master.controller.apply(config)
        except (OSError, RuntimeError, TableFull) as e:
            raise AdminError(503, f"not applied: {e}") from None
        log.info("%s", words)
