"""Work saved on the hot paths keeps its behaviour: an idle dispatcher round runs no claim
script; the attempt that sends a held job takes it out of the held set."""

from __future__ import annotations

import redis

from tests.policy_kit import new_job, submit_now
from worker import keys
from worker.fleet.dispatcher import Dispatcher, due_schedules
from worker.services import Services


def _script_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(
        int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval")
    )


def test_due_schedules_names_each_schedule_whose_first_entry_is_due(
    policy_redis: redis.Redis,
) -> None:
    assert due_schedules(policy_redis) == (set(), {})
    now = float(policy_redis.time()[0])
    policy_redis.zadd(keys.NOTIFY_SCHEDULE, {"later": now + 60})
    policy_redis.zadd(keys.ARCHIVE_SCHEDULE, {"past": now - 1})
    assert due_schedules(policy_redis)[0] == {keys.ARCHIVE_SCHEDULE}


def test_the_same_round_trip_says_how_many_jobs_wait_in_each_providers_lines(
    svc: Services,
) -> None:
    assert due_schedules(svc.store.redis, ["kie", "ideogram-remix"])[1] == {
        "kie": 0,
        "ideogram-remix": 0,
    }
    new_job(svc)
    new_job(svc)
    assert due_schedules(svc.store.redis, ["kie"])[1] == {"kie": 2}


def test_an_idle_round_runs_no_claim_script_and_a_due_job_is_still_sent(svc: Services) -> None:
    dispatcher = Dispatcher(svc)
    dispatcher.tick()  # the first round's heartbeat and store check
    before = _script_calls(svc.store.redis)

    assert dispatcher.tick() == 0
    assert _script_calls(svc.store.redis) == before

    job_id, _ = new_job(svc)
    svc.store.redis.zadd(keys.SCHEDULE, {job_id: 0})
    assert dispatcher.tick() == 1
    assert _script_calls(svc.store.redis) > before


def test_the_attempt_that_sends_a_held_job_takes_it_out_of_the_held_set(svc: Services) -> None:
    job_id, _ = new_job(svc)
    svc.store.hold(svc.api_key_id, job_id)
    assert svc.store.redis.sismember(keys.held(svc.api_key_id), job_id)

    assert submit_now(svc, job_id) == "accepted"

    assert not svc.store.redis.sismember(keys.held(svc.api_key_id), job_id)
