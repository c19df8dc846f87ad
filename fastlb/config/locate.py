"""Line numbers of the keys of a TOML document (``tomllib`` gives none).

``Locator(text).line(path)`` is the line where ``path`` -- a tuple of keys
and array indexes, as ``("listeners", "web", "routes", 1, "pool")`` -- is
defined; when that exact key is not in the text (a missing key, a default)
it is the line of the nearest enclosing table or value that is.

The scanner runs over text that ``tomllib`` has already accepted, so it
only has to follow the structure, not to check it. It knows:

* table headers ``[a.b]`` and array-of-tables headers ``[[a.b]]``, counting
  each array's elements (the first ``[[listeners.web.routes]]`` under a
  listener is index 0, the next 1, and a header below an array of tables
  belongs to its last element, as TOML says);
* keys ``k = v``, dotted keys ``a.b.c = v`` and quoted keys (``"a.b" = v``
  is one key);
* values: strings of the four kinds (multi-line ones count their lines),
  arrays (each element's line, so ``backends[1]`` is found on its own line),
  inline tables (their keys), and other scalars up to the next delimiter;
* comments and blank lines.

A path is recorded at the first place it appears: a table that is created
implicitly (``[a.b]`` creates ``a``) takes the line of that first header.
Anything the scanner does not expect ends the scan quietly: what was
recorded so far stays, and the rest falls back to no line at all.
"""
import bisect
import tomllib

__all__ = ["Locator", "dotted"]

_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_SCALAR_END = frozenset(",]}#\n")


def dotted(path):
    """``("listeners", "web", "routes", 1, "pool")`` -> ``listeners.web.routes[1].pool``;
    keys that are not bare TOML keys are quoted."""
    out = []
    for part in path:
        if isinstance(part, int):
            out.append(f"[{part}]")
        else:
            key = part if part and all(c in _BARE for c in part) else _quote(part)
            out.append(("." if out else "") + key)
    return "".join(out)


def _quote(key):
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Locator:
    """Where each key of a TOML text is: ``line(path)``, ``exact(path)``."""

    def __init__(self, text):
        self._text = text
        self._newlines = [i for i, c in enumerate(text) if c == "\n"]
        self._lines = {}        # path tuple -> line (1-based)
        self._aot = {}          # resolved path of an array of tables -> elements so far
        self._i = 0
        try:
            self._document()
        except (IndexError, ValueError, tomllib.TOMLDecodeError):
            pass    # not expected for text tomllib accepted; keep what was found

    # -------------------------------------------------------- queries

    def exact(self, path):
        """The line of ``path`` itself, or None."""
        return self._lines.get(tuple(path))

    def line(self, path):
        """The line of ``path``, else of its nearest recorded ancestor, else None."""
        path = tuple(path)
        while path:
            line = self._lines.get(path)
            if line is not None:
                return line
            path = path[:-1]
        return None

    def paths(self):
        """Every recorded path -> line (for tests and for ``Config.where``)."""
        return dict(self._lines)

    # -------------------------------------------------------- scanning

    def _line_at(self, pos):
        return bisect.bisect_right(self._newlines, pos - 1) + 1

    def _record(self, path, pos):
        self._lines.setdefault(path, self._line_at(pos))

    def _record_prefixes(self, path, pos, start=1):
        for n in range(start, len(path) + 1):
            self._record(path[:n], pos)

    def _document(self):
        s = self._text
        table = ()
        while True:
            self._skip_space(newlines=True)
            if self._i >= len(s):
                return
            pos = self._i
            if s.startswith("[[", pos):
                self._i += 2
                keys = self._dotted_key()
                self._expect("]]")
                array = self._resolve(keys[:-1]) + (keys[-1],)
                index = self._aot.get(array, 0)
                self._aot[array] = index + 1
                table = array + (index,)
                self._record_prefixes(table, pos)
            elif s[pos] == "[":
                self._i += 1
                keys = self._dotted_key()
                self._expect("]")
                table = self._resolve(keys)
                self._record_prefixes(table, pos)
            else:
                keys = self._dotted_key()
                self._expect("=")
                path = table + keys
                self._record_prefixes(path, pos, start=len(table) + 1)
                self._skip_space()
                self._value(path)

    def _resolve(self, keys):
        """A header's keys with the current index of every array of tables on the way."""
        out = ()
        for key in keys:
            out += (key,)
            if out in self._aot:
                out += (self._aot[out] - 1,)
        return out

    def _skip_space(self, newlines=False):
        s, i = self._text, self._i
        while i < len(s):
            c = s[i]
            if c in " \t\r" or (newlines and c == "\n"):
                i += 1
            elif c == "#":
                while i < len(s) and s[i] != "\n":
                    i += 1
            else:
                break
        self._i = i

    def _expect(self, token):
        self._skip_space()
        if not self._text.startswith(token, self._i):
            raise ValueError(f"expected {token!r} at {self._i}")
        self._i += len(token)

    def _dotted_key(self):
        keys = []
        while True:
            self._skip_space()
            keys.append(self._key())
            self._skip_space()
            if self._text.startswith(".", self._i):
                self._i += 1
                continue
            return tuple(keys)

    def _key(self):
        s, i = self._text, self._i
        if s[i] in "\"'":
            start = i
            self._string()
            # decode the quoted key exactly as tomllib does
            return tomllib.loads("k = " + s[start:self._i])["k"]
        start = i
        while i < len(s) and s[i] in _BARE:
            i += 1
        if i == start:
            raise ValueError(f"expected a key at {i}")
        self._i = i
        return s[start:i]

    def _value(self, path):
        s = self._text
        c = s[self._i]
        if c in "\"'":
            self._string()
        elif c == "[":
            self._array(path)
        elif c == "{":
            self._inline_table(path)
        else:
            i = self._i
            while i < len(s) and s[i] not in _SCALAR_END:
                i += 1
            self._i = i

    def _array(self, path):
        self._i += 1
        index = 0
        while True:
            self._skip_space(newlines=True)
            if self._text[self._i] == "]":
                self._i += 1
                return
            self._record(path + (index,), self._i)
            self._value(path + (index,))
            index += 1
            self._skip_space(newlines=True)
            if self._text[self._i] == ",":
                self._i += 1

    def _inline_table(self, path):
        self._i += 1
        while True:
            self._skip_space(newlines=True)
            if self._text[self._i] == "}":
                self._i += 1
                return
            pos = self._i
            keys = self._dotted_key()
            self._expect("=")
            self._record_prefixes(path + keys, pos, start=len(path) + 1)
            self._skip_space()
            self._value(path + keys)
            self._skip_space(newlines=True)
            if self._text[self._i] == ",":
                self._i += 1

    def _string(self):
        s, i = self._text, self._i
        for quote in ('"""', "'''"):
            if s.startswith(quote, i):
                i += 3
                while True:
                    if quote == '"""' and s[i] == "\\":
                        i += 2
                    elif s.startswith(quote, i):
                        i += 3
                        # up to two quotes just before the closing ones belong to the string
                        extra = 0
                        while extra < 2 and i < len(s) and s[i] == quote[0]:
                            i += 1
                            extra += 1
                        self._i = i
                        return
                    else:
                        i += 1
        quote = s[i]
        i += 1
        while s[i] != quote:
            i += 2 if quote == '"' and s[i] == "\\" else 1
        self._i = i + 1
