// A Stagecoach HTTP API client in Node.js (>= 18) with nothing but the built-in `fetch`:
// submit a job, stream its events (server-sent events, resuming with Last-Event-ID if the connection
// drops), and print the JobResult.
//
//   STAGECOACH_API=http://127.0.0.1:8000 STAGECOACH_TOKEN=sc_... node client.mjs qa '{"question": "Why?"}'
//
// Events go to stderr as they come, one line each; the JobResult is printed on stdout as JSON.
// Exit code: 0 the job succeeded, 1 it failed, 2 the API refused the request (its JSON error on stderr).

const api = process.env.STAGECOACH_API ?? "http://127.0.0.1:8000";
const token = process.env.STAGECOACH_TOKEN;
const [pipeline, inputsJson = "{}", priority] = process.argv.slice(2);
if (!pipeline) {
  console.error("usage: node client.mjs PIPELINE INPUTS_JSON [PRIORITY]");
  process.exit(2);
}
const headers = { "Content-Type": "application/json", ...(token ? { Authorization: `Bearer ${token}` } : {}) };

async function submit() {
  const body = { pipeline, inputs: JSON.parse(inputsJson) };
  if (priority !== undefined) body.priority = Number(priority);
  const response = await fetch(`${api}/v1/jobs`, { method: "POST", headers, body: JSON.stringify(body) });
  const answer = await response.json();
  if (response.status !== 202) {
    console.error(`refused (${response.status}): ${JSON.stringify(answer)}`);
    process.exit(2);
  }
  return answer; // {job_id, status_url, result_url, events_url}
}

// Parse a text/event-stream body: calls onEvent({id, event, data}) per event.
async function readEvents(body, onEvent) {
  const decoder = new TextDecoder();
  let buffer = "";
  let event = {};
  for await (const chunk of body) {
    buffer += decoder.decode(chunk, { stream: true });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (line === "") {
        if (event.data !== undefined) onEvent(event);
        event = {};
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        event[name] = event[name] === undefined ? value : `${event[name]}\n${value}`;
      }
    }
  }
}

// Follow the job's events to its JobResult; a dropped connection resumes after the last event seen.
async function follow(eventsUrl) {
  let lastId = null;
  for (let attempt = 0; attempt < 20; attempt++) {
    const response = await fetch(eventsUrl, { headers: { ...headers, ...(lastId ? { "Last-Event-ID": lastId } : {}) } });
    if (response.status !== 200) throw new Error(`events: HTTP ${response.status}: ${await response.text()}`);
    let result = null;
    try {
      await readEvents(response.body, (event) => {
        lastId = event.id;
        if (event.event === "result") {
          result = JSON.parse(event.data);
        } else {
          const data = JSON.parse(event.data);
          console.error(`${event.event} ${data.stage ?? data.node ?? ""} ${data.outcome ?? data.state ?? ""}`.trim());
        }
      });
    } catch (error) {
      console.error(`stream interrupted (${error.message}); resuming after ${lastId}`);
    }
    if (result) return result;
  }
  throw new Error("no result after 20 reconnections");
}

const job = await submit();
console.error(`job ${job.job_id}: ${job.status_url}`);
const result = await follow(job.events_url);
console.log(JSON.stringify(result));
process.exit(result.state === "succeeded" ? 0 : 1);
