"""Tooling the ``backfill stub`` and ``backfill demo`` commands run, kept out of the
delivery code: the provider stub (``stub``, ``stub_server``), private Redis servers and
worker processes (``processes``), and the demo (``demo``). Tests, ``ops/`` scripts and the
demo use them; a production worker never imports them."""
