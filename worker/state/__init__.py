"""State: everything kept in Redis. The keys (``keys``), the connection, the store and
its Lua scripts (``store``, ``scripts``, ``lua/``), a delivery's stored forms
(``delivery``), the read model (``reads``, ``lookup``), dead letters and Redis's
memory (``capacity``).
"""
