"""The running balancer's configuration glue, kept off the per-request path.

* ``fastlb.runtime.build``: turns a ``fastlb.config.Config`` into the objects
  the data path reads (``Pool``, ``Front``, ``Backend`` of
  ``fastlb.proxy``), and applies a reload as a diff of old and new.
* ``fastlb.runtime.routing``: a listener's routes, compiled at load time
  into the lookup a request's Host and path go through.

The listeners, signals and drain are in ``fastlb.server``.
"""
