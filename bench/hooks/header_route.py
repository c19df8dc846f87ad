"""A route hook that reads a header and names a pool: the view's fields
parsed, one lookup, the pool found by name
(``python bench/inmem.py --hooks bench/hooks/header_route.py``)."""


def route(request):
    return "default" if request.header("Cookie") is not None else None
