"""The old name of ``fastlb.observe.accesslog``, kept while importers move to the new one."""
from fastlb.observe.accesslog import BATCH_BYTES, FORMATS, AccessLog

__all__ = ["AccessLog", "BATCH_BYTES", "FORMATS"]
