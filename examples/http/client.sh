#!/bin/sh
# A Stagecoach HTTP API client in POSIX shell with nothing but curl (and sed):
# submit a job, stream its events, then read its JobResult.
#
#   STAGECOACH_API=http://127.0.0.1:8000 STAGECOACH_TOKEN=sc_... ./client.sh qa '{"question": "Why?"}'
#
# Events go to stderr as they come; the JobResult is printed on stdout as JSON.
# Exit code: 0 the job succeeded, 1 it failed, 2 the API refused the request (its JSON error on stderr).
set -eu
API="${STAGECOACH_API:-http://127.0.0.1:8000}"
PIPELINE="$1"
INPUTS="${2:-{\}}"
AUTH="Authorization: Bearer ${STAGECOACH_TOKEN:-}"

# submit: 202 and {job_id, status_url, result_url, events_url}, or an error as JSON
answer=$(curl -sS -w '\n%{http_code}' -X POST "$API/v1/jobs" -H "$AUTH" -H 'Content-Type: application/json' \
  --data-binary "{\"pipeline\": \"$PIPELINE\", \"inputs\": $INPUTS}")
status=$(printf '%s\n' "$answer" | tail -n 1)
body=$(printf '%s\n' "$answer" | sed '$d')
if [ "$status" != 202 ]; then
  echo "refused ($status): $body" >&2
  exit 2
fi
job_id=$(printf '%s' "$body" | sed -n 's/.*"job_id": *"\([^"]*\)".*/\1/p')
echo "job $job_id" >&2

# stream its events (server-sent events); the stream ends after the `result` event
curl -sSN "$API/v1/jobs/$job_id/events" -H "$AUTH" | sed -n 's/^event: //p' >&2

# the JobResult (long poll: waits up to 30 s for the end)
result=$(curl -sS "$API/v1/jobs/$job_id/result?wait=30" -H "$AUTH")
printf '%s\n' "$result"
case "$result" in
  *'"state":"succeeded"'*|*'"state": "succeeded"'*) exit 0 ;;
  *) exit 1 ;;
esac
