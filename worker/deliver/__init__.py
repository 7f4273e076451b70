"""Deliver: a stored record goes out. The waker and its wake-up messages, the Celery
task, the drains that claim, send and record (``drain``, ``lanes``, ``inflight``,
``steps``), the provider client (``provider``, ``deadline``), what an answer means
(``policy``) and the broker guard (``transport``).
"""
