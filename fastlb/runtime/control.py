"""One door for changes to the running configuration.

A SIGHUP reload, the admin API (add or remove a backend) and discovery (a
pool's backends found in DNS or etcd) all change what runs; they go through
the process's ``Controller``, one change at a time (a lock), each a reload
(``fastlb.server.reload`` in one process; a new generation of workers with
a master).

The controller keeps what discovery found per pool and lays it over every
configuration it applies, so a reload of the file does not drop the
discovered backends of a pool (the file's own list of that pool is then
only its starting point). Changes made through the admin API are made on
the running configuration: the next reload of the file replaces them.
"""
import asyncio
import dataclasses
import logging

__all__ = ["Controller", "ProcessController", "MasterController"]

log = logging.getLogger("fastlb")


class Controller:
    def __init__(self, config):
        self.base = config          # as last loaded (the file or the flags)
        self.discovered = {}        # pool name -> (BackendConfig, ...) from discovery
        self.followers = []         # called with each new base configuration (discovery
        #                             starts and stops its sources as its pools say)
        self._lock = asyncio.Lock()

    @property
    def config(self):
        """The running configuration."""
        raise NotImplementedError

    async def _apply(self, config):
        raise NotImplementedError

    def overlay(self, config):
        """``config`` with the discovered backends of its pools (of those that
        have discovery in ``config``: a pool whose discovery a reload took
        away runs the backends of its file again)."""
        pools = None
        for name, backends in self.discovered.items():
            pc = config.pools.get(name)
            if pc is not None and pc.discovery is not None and pc.backends != backends:
                if pools is None:
                    pools = dict(config.pools)
                pools[name] = dataclasses.replace(pc, backends=backends)
        return config if pools is None else dataclasses.replace(config, pools=pools)

    async def apply(self, config):
        """Run ``config`` (valid) from now on; returns the summary of what
        changed. Raises OSError (a listener that cannot listen), TableFull
        or RuntimeError (workers that cannot start): then nothing changed."""
        async with self._lock:
            return await self._apply(config)

    async def reload_base(self, config):
        """A new configuration was loaded (SIGHUP): run it, discovered backends laid over."""
        async with self._lock:
            summary = await self._apply(self.overlay(config))
            self.base = config
            for follow in self.followers:
                follow(config)
            return summary

    async def set_backends(self, pool, backends):
        """Discovery found ``backends`` (BackendConfig, in a stable order) for
        ``pool``: run the running configuration with them. Returns the
        summary, or None when nothing changed."""
        backends = tuple(backends)
        async with self._lock:
            old = self.discovered.get(pool)
            self.discovered[pool] = backends
            new = self.overlay(self.config)
            if new is self.config or (old == backends and new == self.config):
                return None
            try:
                return await self._apply(new)
            except BaseException:
                if old is None:
                    self.discovered.pop(pool, None)
                else:
                    self.discovered[pool] = old
                raise


class ProcessController(Controller):
    """One process: reloads in place."""

    def __init__(self, proxy, info=None):
        super().__init__(proxy.config)
        self.proxy = proxy
        self.info = info

    @property
    def config(self):
        return self.proxy.config

    async def _apply(self, config):
        from fastlb import server

        summary = await server.reload(self.proxy, config)
        if self.info is not None:
            self.info.reloaded("ok")
        return summary


class MasterController(Controller):
    """A master: every change is a new generation of workers."""

    def __init__(self, master):
        super().__init__(master.config)
        self.master = master

    @property
    def config(self):
        return self.master.config

    async def _apply(self, config):
        return await self.master.reload(config)
