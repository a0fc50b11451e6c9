"""A real broker fuzzed over MDPC01, MDPW01, ZBW01, ZBC01 and its event endpoints.

Four fixed seeds, each against a fresh `zbroker start` process: 10,000 messages from
several peers (tests/hostile/fuzz.py), a probe (8/MMI and STATS from a fresh socket)
every 1,000. The broker must stay up, answer every probe within PROBE_DEADLINE_S, count
what it refused (the fuzzer reached the error paths) and keep its RSS within
RSS_BUDGET_MIB. `python3 dev.py bench --only fuzz` runs the same fuzzer for a million.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import zmq

from tests.conftest import BrokerProcess
from tests.hostile.fuzz import RSS_BUDGET_MIB, Endpoints, Fuzzer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

SEEDS = (1, 2, 3, 4)
MESSAGES_PER_SEED = 10_000
PROBE_EVERY = 1_000
# One costly shot (a batch of 10,000 tasks, a message near or over the byte or frame
# cap, a 64 MiB frame that libzmq refuses...) per this many messages: 10 per seed.
HEAVY_EVERY = 1_000
# Refusal reasons a run of 10,000 messages reaches whatever the seed (each of them
# comes from hundreds of shots; the rarer ones, oversized and too_many_frames, from
# the few heavy shots, so they are not required).
REASONS_REACHED = {"bad_meta", "bad_header", "unknown_command", "missing_frames", "bad_delimiter"}


@pytest.mark.parametrize("seed", SEEDS)
def test_broker_survives_a_seeded_fuzz(
    seed: int,
    broker_factory: Callable[..., BrokerProcess],
    zmq_ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    # Given a fresh broker (info level: a debug line per refused message slows it down)
    broker = broker_factory("--log-level", "info")
    assert broker.proc is not None
    proc = broker.proc
    fuzzer = Fuzzer(
        zmq_ctx,
        Endpoints(broker.endpoint, broker.events_in, broker.events_out),
        proc.pid,
        alive=lambda: proc.poll() is None,
        seed=seed,
        probe_every=PROBE_EVERY,
        heavy_every=HEAVY_EVERY,
        allow_huge=True,
    )
    # When hostile peers send it 10,000 messages of this seed
    report = fuzzer.run(MESSAGES_PER_SEED)
    # Then it is alive, answered every probe and stayed within its memory budget
    context = f"{report.describe()}\n--- broker log (end) ---\n{broker.log()[-4000:]}"
    assert report.failure is None, context
    assert proc.poll() is None, context
    assert report.messages == MESSAGES_PER_SEED
    assert report.probes_answered == MESSAGES_PER_SEED // PROBE_EVERY
    assert report.probes_missed == 0
    assert report.rss_peak_kib <= RSS_BUDGET_MIB * 1024, context
    # And the fuzzer reached its error paths: refusals were counted, for many reasons
    assert report.malformed_rise > MESSAGES_PER_SEED // 10, context
    assert set(report.malformed_end) >= REASONS_REACHED, context
    assert report.stats_end["stats"]["calls_refused"] > 0, context
