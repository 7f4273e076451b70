"""``backfill console``: the operators' web console (server-rendered, no JavaScript).

``app.create_app`` builds the FastAPI application (the guard on every request, the
security headers, rendering); ``routes`` are its pages and actions; ``auth`` checks who
asks (HTTP Basic against ``BACKFILL_CONSOLE_USERS``) and that a state-changing request
came from the console's own pages (same origin and a CSRF token); ``queries`` reads what
the pages show; ``actions`` replays and purges dead letters, with an audit line each.
"""
