"""Every number the wire protocols fix, in one place: caps, batch sizes, ranges.

The codecs, the broker core, both Python clients and the docs take these from
here; the Node client keeps its own copies, which tests/crosslang/test_shared_vocabulary.py
compares with these. Pure constants: nothing to import, no I/O.
"""

from __future__ import annotations

from typing import Final

# ------------------------------------------------ any message on the ROUTER (§7)

# The broker's --max-message-bytes default: what one message may cost it in memory.
DEFAULT_MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
# Frames per message, the routing id included: a ZBC01 batch carries a frame per task,
# so MAX_BATCH one-frame tasks must fit, and per-message bookkeeping stays bounded.
MAX_FRAMES: Final = 16_384
# Smallest max_message_bytes a worker or service (and a Python client) accepts: its
# own metadata (ids, FAIL reasons, heartbeat metrics) must always fit beside a result.
MIN_MESSAGE_BYTES: Final = 4096
# A ZBC01 call over a cap is answered with too_large only if its meta frame is
# smaller than this: reading a huge frame just to find its rid would defeat the cap.
MAX_OVERSIZED_META_BYTES: Final = 64 * 1024

# ----------------------------------------------------------- ZBC01 calls (§11)

# Tasks per ENQUEUE, ids per REDRIVE or DROP, tasks acted on per PURGE: one call is
# one journal commit, and its size must stay bounded. A longer list is refused.
ZBC_MAX_BATCH: Final = 10_000
# What a client should fit one ENQUEUE batch into: MAX_FRAMES and the default byte
# cap, less room for the routing id, header frames and the meta map.
BATCH_FRAMES: Final = 16_000
BATCH_BYTES: Final = 15 * 1024 * 1024
# Longest a REQUEST or RESULT call is held for a result: a day; clients poll for longer.
MAX_WAIT_S: Final = 24 * 3600.0
# Entries per page of DEAD and TASKS: an answer stays far below the message cap.
MAX_LIST: Final = 1000
# Services per page of QUEUES (`limit`), and the page a call without `limit` gets:
# one page is what the broker's loop builds between two passes, so it stays short
# however many services there are.
MAX_QUEUES_PAGE: Final = 1000
DEFAULT_QUEUES_PAGE: Final = 500
# Most payload bytes a STATUS may ask to see (`preview`): a glimpse, never the payload.
MAX_PREVIEW_BYTES: Final = 4096
# Largest TASKS `after` (entries skipped): far above any list a scan can produce.
MAX_LIST_AFTER: Final = 10**9
# Task priority, higher first: one byte in the journal's index keys.
PRIORITY_MIN: Final = -128
PRIORITY_MAX: Final = 127
# Most attempts a task may ask for: a retry loop must end.
MAX_ATTEMPTS_LIMIT: Final = 1000
# Largest concurrency LIMIT of a service (tasks its workers hold together).
MAX_SERVICE_LIMIT: Final = 1_000_000

# -------------------------------------------------------- ZBW01 workers (§10)

# Tasks one worker may hold at once (READY `credit`): bounds what a lost worker strands.
MAX_CREDIT: Final = 10_000
# Tags in a READY: they are kept per worker and shown by WORKERS.
MAX_TAGS: Final = 32
# Entries of one TASKS or DONES message: one message, one bounded meta map.
ZBW_MAX_BATCH: Final = 1024

# ------------------------------------------------------------ topic events (§6)

# Bytes of an event type (the topic frame): services build topics from their names.
MAX_TOPIC_BYTES: Final = 255
# Events in one batch message as the broker publishes them; receivers take any number.
MAX_BATCH_EVENTS: Final = 1024

# ------------------------------------------------------------ task streams (§13)

# Chunks a STREAM or READ call may have sent to it beyond what MORE credited
# (`window`): the default, and the most a call may ask for.
STREAM_WINDOW_DEFAULT: Final = 256
STREAM_WINDOW_MAX: Final = 10_000
# Chunks one MORE may credit.
STREAM_CREDIT_MAX: Final = 10_000
# Chunk data the broker sends one call beyond its credit, whatever its window (one
# chunk always goes): what a reader that does not read can cost in send buffers.
STREAM_UNCREDITED_BYTES: Final = 4 * 1024 * 1024
# The broker's per-task stream caps (--max-stream-chunks, --max-stream-bytes),
# over all attempts: what one task's stream may take in the journal.
DEFAULT_MAX_STREAM_CHUNKS: Final = 100_000
DEFAULT_MAX_STREAM_BYTES: Final = 64 * 1024 * 1024
# Chunks per CHUNKS message the broker sends (one message, one bounded read).
STREAM_CHUNKS_PER_MESSAGE: Final = 1024

# ------------------------------------------------------------ task graphs (§15)

# Tasks one task may depend on (`depends_on`): a fan-in of this many.
MAX_DEPENDENCIES: Final = 1000

# ------------------------------------------------------------ flow control (§16)

# A RATE's tasks per second (more is no limit worth keeping), and its burst.
MAX_RATE_PER_S: Final = 1_000_000.0
MAX_BURST: Final = 1_000_000

# ------------------------------------------------------ recurring tasks (§17)

# Schedules one broker keeps: each is held in memory (its payload included) and
# looked at by the timers, so their number is bounded.
MAX_SCHEDULES: Final = 1000
# Bytes of a schedule's name: it is part of every firing's idempotency key and topic.
MAX_SCHEDULE_NAME_BYTES: Final = 128
# The shortest `every_s`: a rule firing more often than each second is a worker's loop.
MIN_SCHEDULE_INTERVAL_S: Final = 1
# The longest `every_s` (a year and a day); a rarer rule is a cron expression.
MAX_SCHEDULE_INTERVAL_S: Final = 366 * 86400
# Payload bytes of a schedule (every frame): kept in memory for every firing.
MAX_SCHEDULE_PAYLOAD_BYTES: Final = 64 * 1024
# Bytes of a cron expression, and of a time zone's name.
MAX_CRON_BYTES: Final = 256
MAX_TZ_BYTES: Final = 64
