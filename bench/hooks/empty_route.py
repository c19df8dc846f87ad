"""A route hook that decides nothing: the cost of having a hook at all
(``python bench/inmem.py --hooks bench/hooks/empty_route.py``)."""


def route(request):
    return None
