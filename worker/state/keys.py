"""Every Redis key the project uses, in one screen (the broker's own keys are kombu's).

Short names: there is one delivery key per record, millions of them in a backfill.
``lua/lib.lua`` builds the same names from ``PREFIX`` (every script gets it last).

- ``bf:d:<id>``        hash: a pending or dead delivery (fields: ``FIELD`` below)
- ``bf:a:<id>``        list: its last attempt documents (compact JSON), oldest first
- ``bf:k:<id>``        string with the dedupe TTL: "<delivered ms>|<callers>" once delivered
- ``bf:q:live``        sorted set: pending live deliveries by due time (ms)
- ``bf:q:bulk``        sorted set: pending bulk deliveries (files, batches, replays)
- ``bf:dead``          sorted set: dead letters by when they died (ms)
- ``bf:dead:app:<a>``  sorted set: the same, one app's (for listing and replaying by app)
- ``bf:paused``        string with a TTL: the fleet-wide pause after an account block
- ``bf:probe``         flag: the pause ended but no answer has proven the account yet
- ``bf:probe:lock``    string with a TTL: one probe attempt in flight
- ``bf:rate``          string: the fleet's rate-limit clock (GCRA arrival time, ms)
- ``bf:outage``        string: "<start ms>|<probe wait ms>" while the fleet holds for an
                       outage (no TTL: the hold lasts as long as the outage)
- ``bf:outage:seen``   sorted set: recent failures that point at the provider, as
                       "<id>|<claim>" by time (ms); cleared by any answer from it
- ``bf:n:<t>``         counter with a TTL of an hour: deliveries recorded in the 10 s
                       from t * 10 s (epoch), for the console's recent figures
- ``bf:nh:<h>``        counter with a TTL of the dedupe window and an hour: deliveries
                       recorded in the hour from h * 3,600 s (epoch), for the count of
                       delivered markers (never scanned for)
- ``bf:m:<t>``         hash with a TTL of an hour: attempts recorded in the minute from
                       t * 60 s (epoch) by verdict (delivered, retry, dead, paused, held,
                       ...), for the console's chart
- ``bf:done``          list: the newest 10,000 deliveries, newest first, for the console's
                       list of delivered ones (a list: a tenth of a sorted set's memory)
- ``bf:ramp``          string with a TTL: "<ms>|<rate>": when sends began to ramp up after a
                       hold or pause, and from what rate (per s)
- ``bf:outage:last``   string: the delivery whose failure came last in a hold (probed in turn)
- ``bf:held:by``       set with a TTL: "<p|o>|<id>": deliveries whose failures began or kept
                       the pause (p) or hold (o); suspects once others' answers end it
- ``bf:before``        string with a TTL: "<ms>|<rate>": when a hold or pause began and the
                       delivery rate before it (sends resume near it after a short one)
- ``bf:worker:<node>`` hash with a TTL: one worker's heartbeat (see heartbeat.py)
- ``bf:room``          string set for a second: does a full Redis take writes again?
- ``bf:workers``       sorted set: the nodes that wrote a heartbeat, by when it expires
                       (ms), so readers never scan for ``bf:worker:*``
- ``bf:xd:<a>``        sorted set, by name (scores 0): one app's lookup index directory, the
                       bound of each of its buckets ('' for the lowest)
- ``bf:xb:<a>\\0<b>``   sorted set, by name: a bucket of the index from bound b, at most 128
                       deliveries as "<msgid>\\0<id>" ("\\0<id>" without a msgid), for lookup.py
- ``bf:x:<a>``         sorted set: an index kept before buckets, moved into them by the sweep
- ``bf:xa``            sorted set, by name: the apps with such an index
- ``bf:xh``            hash: per app, the entry where enqueue's sweep of its index stopped;
                       field "": the app swept last in turn

A delivery_id is derived from the record (``delivery.delivery_id``), so the delivery key
is its own idempotency key.
"""

from __future__ import annotations

PREFIX = "bf:"
LIVE = PREFIX + "q:live"
BULK = PREFIX + "q:bulk"
DEAD = PREFIX + "dead"
PAUSED = PREFIX + "paused"
PROBE = PREFIX + "probe"
PROBE_LOCK = PREFIX + "probe:lock"
RATE = PREFIX + "rate"
OUTAGE = PREFIX + "outage"
OUTAGE_SEEN = PREFIX + "outage:seen"
RAMP = PREFIX + "ramp"
OUTAGE_LAST = PREFIX + "outage:last"
HELD_BY = PREFIX + "held:by"
BEFORE = PREFIX + "before"
COUNTED_EVERY_MS = 10_000  # the span of one ``delivered_in`` counter
DONE = PREFIX + "done"
DONE_KEPT = 10_000  # the step script keeps this many of the newest (lua/step.lua)


def delivered_in(span: int) -> str:
    """The counter of deliveries recorded in the 10 s span ``span`` (epoch ms // 10,000)."""
    return f"{PREFIX}n:{span}"


def delivered_in_hour(hour: int) -> str:
    """The counter of deliveries recorded in the hour ``hour`` (epoch ms // 3,600,000)."""
    return f"{PREFIX}nh:{hour}"


COUNTED_HOUR_MS = 3_600_000  # the span of one ``delivered_in_hour`` counter


def outcomes_in(minute: int) -> str:
    """The attempts recorded in minute ``minute`` (epoch ms // 60,000), by verdict."""
    return f"{PREFIX}m:{minute}"


ROOM = PREFIX + "room"  # set for a second to learn whether a full Redis takes writes again
WORKER = PREFIX + "worker:"
WORKERS = PREFIX + "workers"
INDEX_APPS = PREFIX + "xa"
INDEX_HAND = PREFIX + "xh"


def delivery(delivery_id: str) -> str:
    """The hash of one pending or dead delivery."""
    return f"{PREFIX}d:{delivery_id}"


def attempts(delivery_id: str) -> str:
    """The attempt history of one delivery."""
    return f"{PREFIX}a:{delivery_id}"


def marker(delivery_id: str) -> str:
    """What a delivered record keeps for the dedupe window."""
    return f"{PREFIX}k:{delivery_id}"


def dead_app(app_id: str) -> str:
    """One app's dead letters."""
    return f"{PREFIX}dead:app:{app_id}"


def worker(node: str) -> str:
    """The heartbeat hash of one worker node."""
    return WORKER + node


def index_directory(app_id: str) -> str:
    """One app's lookup index directory: the bound of each of its buckets."""
    return f"{PREFIX}xd:{app_id}"


def index_bucket(app_id: str, bound: str) -> str:
    """The bucket of an app's lookup index from ``bound`` (its entries from there on)."""
    return f"{PREFIX}xb:{app_id}\0{bound}"


def legacy_index(app_id: str) -> str:
    """An app's lookup index as kept before buckets: moved into them by enqueue's sweep."""
    return f"{PREFIX}x:{app_id}"


# The fields of a delivery hash, by name: one letter each, as they are stored once per
# delivery. The scripts get the same table (``F.<name>``, see scripts.py). States: p
# pending, x dead, d delivered (kept a while); lanes: l live, b bulk; suspect: 'p' its
# account-blocked answers and 'o' its outage-like failures are its own (a pause or hold it
# kept was ended by others).
FIELD = {
    "app_id": "a", "msgid": "m", "number": "n", "time": "t",  # the record
    "state": "s", "lane": "q",
    "due": "u", "lease": "l",  # ms
    "attempts": "c", "claims": "k",  # attempts counted; claims made (the claim token)
    "created": "w", "dead_at": "z", "delivered_at": "y",  # ms
    "replay": "r",  # 1 after a replay
    "callers": "i",  # the intake tokens that may read it
    "suspect": "g",
}  # fmt: skip
