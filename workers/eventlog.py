"""The event log: a job's life as typed events (contracts/events.py) on Redis streams.

- one stream per job (`stagecoach:job:<id>:events`), bounded by STAGECOACH_EVENTS_PER_JOB and expiring
  with the job: whoever follows a job (the HTTP API's server-sent events, a late reader, a trace)
  reads it back from any entry id, so a reader that reconnects misses nothing;
- one stream for the whole fleet (`stagecoach:events`), bounded by STAGECOACH_EVENTS_MAXLEN, which
  the monitor reads through a consumer group, so a monitor that was down catches up.

Entries are `{type: <event name>, data: <the model's JSON>}`. They are written in the Redis round trips
the workers make anyway: the ledger's start, begin and close scripts append from Lua (only when the
script's claim succeeds, so a duplicate delivery writes nothing), its checkpoint pipeline appends the
stage's outcome, decisions and published fields. Answer fields published early are on the job's
stream only (they can be large); everything else is on both.
"""

from collections.abc import Sequence
from typing import Any

import redis

from contracts.events import FieldsPublished, StagecoachEvent, event_name, parse_event
from contracts.names import EVENTS_STREAM, job_events_key


def entry(event: StagecoachEvent) -> dict[str, str]:
    return {"type": event_name(event), "data": event.model_dump_json()}


def for_script(event: StagecoachEvent) -> list[str]:
    """The type name and JSON of an event, as a Lua script's arguments (see APPEND_LUA)."""
    return [event_name(event), event.model_dump_json()]


# A Lua function the ledger's scripts start with: append one event to the job's stream and the fleet's
APPEND_LUA = """
local function append(job_stream, fleet_stream, job_max, fleet_max, ttl, name, data)
  redis.call('XADD', job_stream, 'MAXLEN', '~', job_max, '*', 'type', name, 'data', data)
  redis.call('EXPIRE', job_stream, ttl)
  if tonumber(fleet_max) > 0 then
    redis.call('XADD', fleet_stream, 'MAXLEN', '~', fleet_max, '*', 'type', name, 'data', data)
  end
end
"""


# A Lua function for scripts that append several events (from ARGV[from]: the per-job bound, the fleet
# bound, the stream's ttl, then per event its type, JSON, and 1 when it goes on the fleet stream too)
APPEND_EACH_LUA = """
local function append_each(job_stream, fleet_stream, from)
  local job_max, fleet_max, ttl = ARGV[from], tonumber(ARGV[from + 1]), ARGV[from + 2]
  if #ARGV < from + 3 then return end
  for i = from + 3, #ARGV, 3 do
    redis.call('XADD', job_stream, 'MAXLEN', '~', job_max, '*', 'type', ARGV[i], 'data', ARGV[i + 1])
    if ARGV[i + 2] == '1' and fleet_max > 0 then
      redis.call('XADD', fleet_stream, 'MAXLEN', '~', fleet_max, '*', 'type', ARGV[i], 'data', ARGV[i + 1])
    end
  end
  redis.call('EXPIRE', job_stream, ttl)
end
"""


def on_fleet_stream(event: StagecoachEvent) -> bool:
    """Answer fields published early stay on the job's own stream (they can be large)."""
    return not isinstance(event, FieldsPublished)


class EventLog:
    def __init__(self, client: redis.Redis, ttl: int, per_job: int = 1000, fleet: int = 100_000) -> None:
        self.client = client
        self.ttl = ttl
        self.per_job = per_job  # entries kept per job stream (approximately: MAXLEN ~)
        self.fleet = fleet  # entries kept on the fleet-wide stream

    def script_keys(self, job_id: str) -> list[str]:
        """The keys a script that appends (APPEND_LUA) declares: the job's stream and the fleet's."""
        return [job_events_key(job_id), EVENTS_STREAM]

    def script_args(self, event: StagecoachEvent) -> list[Any]:
        """What such a script takes for one event: the bounds, then the event's type name and JSON."""
        return [self.per_job, self.fleet, *for_script(event)]

    def each_args(self, events: Sequence[StagecoachEvent]) -> list[Any]:
        """What a script calling `append_each` (APPEND_EACH_LUA) takes for `events`."""
        args: list[Any] = [self.per_job, self.fleet, self.ttl]
        for event in events:
            args += [*for_script(event), int(on_fleet_stream(event))]
        return args

    def queue(self, pipe: "redis.client.Pipeline", job_id: str, events: Sequence[StagecoachEvent]) -> None:
        """Append `events` of one job on the caller's pipeline (sent in the round trip it makes anyway)."""
        if not events:
            return
        key = job_events_key(job_id)
        for event in events:
            fields: Any = entry(event)
            pipe.xadd(key, fields, maxlen=self.per_job, approximate=True)
            if on_fleet_stream(event):
                pipe.xadd(EVENTS_STREAM, fields, maxlen=self.fleet, approximate=True)
        pipe.expire(key, self.ttl)

    def append(self, job_id: str, events: Sequence[StagecoachEvent]) -> None:
        """Append `events` in a round trip of their own (for writers with none to share)."""
        pipe = self.client.pipeline(transaction=False)
        self.queue(pipe, job_id, events)
        pipe.execute()

    def read(self, job_id: str, after: str = "0-0", count: int = 100,
             block_ms: int | None = None) -> list[tuple[str, StagecoachEvent]]:
        """A job's events after entry id `after` ("0-0": from the start), oldest first; with `block_ms`,
        wait that long for the first new one. Entries that do not parse are skipped."""
        key = job_events_key(job_id)
        raw: Any
        if block_ms is None:
            raw = self.client.xrange(key, min=f"({after}" if after != "0-0" else "-", count=count)
        else:
            streams: Any = self.client.xread({key: after}, count=count, block=block_ms)
            raw = streams[0][1] if streams else []
        return [(text(entry_id), event) for entry_id, fields in raw if (event := decode(fields)) is not None]


def decode(fields: dict[Any, Any]) -> StagecoachEvent | None:
    """A stream entry's event; None for an entry that is not one (unknown type, bad data)."""
    values = {text(k): v for k, v in fields.items()}
    try:
        return parse_event(text(values["type"]), values["data"])
    except (KeyError, ValueError):
        return None


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
