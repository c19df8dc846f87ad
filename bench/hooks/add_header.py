"""A request_headers hook that adds one field to the head sent upstream
(``python bench/inmem.py --hooks bench/hooks/add_header.py``)."""


def request_headers(request):
    return [("X-Hooked", "1")]
