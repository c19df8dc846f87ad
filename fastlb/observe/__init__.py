"""What the proxy reports: the access log.

``logline.pxi`` is a piece of the compiled core ``fastlb._core`` (which includes
it), with its pure twin ``logline.py`` beside it; ``accesslog.py`` is the writer
thread that takes their batches to a file.
"""
