"""The Lua sandbox of the bundled worker: what sandboxed code may reach.

:func:`install_sandbox` runs once per Lua runtime, before any user code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["install_sandbox"]

# Strips what a sandbox must not offer and installs a text-only module searcher
# (binary chunks can crash the VM).
_SANDBOX = r"""
local host = ...
os.execute, os.exit, os.remove, os.rename, os.tmpname, os.getenv, os.setlocale =
  nil, nil, nil, nil, nil, nil, nil
io = nil
package.loadlib, package.cpath = nil, ""
string.dump = nil
loadfile, dofile = nil, nil
debug = { traceback = debug.traceback }
local raw_load = load
load = function(chunk, name, _, ...)
  if select("#", ...) > 0 then return raw_load(chunk, name, "t", ...) end
  return raw_load(chunk, name, "t")
end
package.searchers = {
  package.searchers[1],
  function(name)
    local path, err = package.searchpath(name, package.path)
    if not path then return "\n\t" .. err end
    local source = host.read_source(path)
    local fn, lerr = raw_load(source, "@" .. path, "t")
    if not fn then error(lerr, 0) end
    return fn, path
  end,
}
"""


def install_sandbox(lua: Any, host: Any, *, lib_paths: Sequence[str] = ()) -> None:
    """Restrict ``lua`` (a ``lupa`` runtime) before user code runs in it."""
    del lib_paths  # not used yet: the file capabilities will be granted per path
    lua.execute(_SANDBOX, host)
