#!/usr/bin/env node
// Start a Stagecoach job from Node.js by task name with celery-node, follow its progress in Redis,
// and print its JobResult as JSON. No Stagecoach code is needed on this side.
//
//   npm ci                      # celery-node + ioredis, versions pinned by package-lock.json
//   node client.js qa '{"question": "Why is the sky blue?"}'
//
// Environment: STAGECOACH_BROKER_URL (redis://... or amqp://...; default redis://127.0.0.1:6379/0),
// STAGECOACH_RESULT_BACKEND (a redis:// URL; default: the broker URL, which must then be Redis),
// STAGECOACH_TIMEOUT_MS (default 120000). Exit codes: 0 succeeded, 1 failed, 2 usage, 3 timeout.
//
// Compatibility with Celery 5.7 (checked): celery-node 0.5 sends task protocol v2 by default
// (headers carry the task name and id; body is [args, kwargs, embed]), JSON only, which is what the
// workers accept. On Redis it LPUSHes the kombu envelope onto the queue list; on RabbitMQ it publishes
// to the default exchange with the queue name as routing key (the queue is declared durable, as Celery
// declares it). Results are read from the Redis result backend key celery-task-meta-<id>, which holds
// {"status": "SUCCESS", "result": <JobResult>, ...} once pipeline.finish has run.
"use strict";

const crypto = require("crypto");
const celery = require("celery-node");
const Redis = require("ioredis");

const ROUTING_QUEUE = "pipeline.routing"; // contracts/names.py: ROUTING_QUEUE
const RUN_TASK = "pipeline.run"; //         contracts/names.py: RUN_TASK
const JOB_KEY_PREFIX = "stagecoach:job:"; // contracts/names.py: JOB_KEY_PREFIX

function usage(message) {
  console.error(`${message}\nusage: node client.js PIPELINE '{"field": "value"}'`);
  process.exit(2);
}

function parseArgs(argv) {
  const [pipeline, rawInputs = "{}"] = argv;
  if (!pipeline) usage("missing PIPELINE");
  let inputs;
  try {
    inputs = JSON.parse(rawInputs);
  } catch (error) {
    usage(`inputs are not JSON: ${error.message}`);
  }
  return { pipeline, inputs };
}

// The job's status hash, written by the workers while it runs: every value is JSON.
// state: queued|running|succeeded|failed; stage and node: where it is now; stages_done: a count.
async function jobStatus(redis, jobId) {
  const raw = await redis.hgetall(JOB_KEY_PREFIX + jobId);
  return Object.fromEntries(Object.entries(raw).map(([key, value]) => [key, JSON.parse(value)]));
}

// Print each change of state or stage to stderr until stopped.
function followProgress(redis, jobId) {
  let last = "";
  const timer = setInterval(async () => {
    const status = await jobStatus(redis, jobId);
    const line = status.state ? `${status.state}${status.stage ? ` in stage ${status.stage}` : ""}` : "";
    if (line && line !== last) {
      console.error(`job ${jobId}: ${line}`);
      last = line;
    }
  }, 100);
  return () => clearInterval(timer);
}

async function main() {
  const { pipeline, inputs } = parseArgs(process.argv.slice(2));
  const broker = process.env.STAGECOACH_BROKER_URL || "redis://127.0.0.1:6379/0";
  const backend = process.env.STAGECOACH_RESULT_BACKEND || broker;
  const timeoutMs = Number(process.env.STAGECOACH_TIMEOUT_MS || 120000);

  const client = celery.createClient(broker, backend, ROUTING_QUEUE);
  const redis = new Redis(backend);
  const jobId = crypto.randomUUID().replace(/-/g, "");
  console.error(`job ${jobId}: submitted to ${pipeline}`);

  const stopFollowing = followProgress(redis, jobId);
  const meta = client.sendTask(RUN_TASK, [{ pipeline, inputs }], {}, jobId);
  let result;
  try {
    result = await meta.get(timeoutMs); // rejects with "TIMEOUT", or "FAILURE" if a task raised
  } catch (error) {
    console.error(`job ${jobId}: ${error.message === "TIMEOUT" ? `no result after ${timeoutMs} ms` : error.message}`);
    await Promise.all([client.disconnect(), redis.quit()]);
    process.exit(error.message === "TIMEOUT" ? 3 : 1);
  } finally {
    stopFollowing();
  }
  const status = await jobStatus(redis, jobId);
  console.error(`job ${jobId}: ${status.state} after ${status.stages_done || 0} stage(s)`);
  console.log(JSON.stringify(result, null, 2));
  await Promise.all([client.disconnect(), redis.quit()]);
  process.exit(result.state === "succeeded" ? 0 : 1);
}

main().catch((error) => {
  console.error(`error: ${error.message}`);
  process.exit(1);
});
