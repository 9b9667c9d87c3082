"""The bundled reference worker: the pool protocol served by real Lua (``lupa``).

Run it with ``python -m pool_notebook.worker --sid SID --sock PATH``; spawn it
from Python with :func:`pool_notebook.spawn.spawn_worker`.
"""
