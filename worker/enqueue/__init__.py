"""Enqueue: a record comes in and is stored. Validation (``record``), the Python API
(``producer``), files and batches (``bulk``) and the HTTP intake (``intake*``), each
storing through ``worker.state``. Nothing here sends to the provider.
"""
