"""`stagecoach` commands. Each command is a thin shell over functions in the other cli modules.

Exit codes: 0 done, 1 a job failed, 2 bad input (unknown pipeline, bad field, bad file line),
3 not finished in time / unknown job, 4 services unreachable or the stack failed.
"""

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.markup import escape

from cli import render
from cli.api_cmd import api, tokens_app
from cli.cache import cache_app
from cli.exits import EXIT_FAILED, EXIT_INPUT, EXIT_PENDING, EXIT_SERVICES
from cli.monitor_cmd import monitor_app
from contracts.errors import StagecoachError, UnknownPipelineError

app = typer.Typer(
    name="stagecoach",
    help="Run multi-stage DSPy programs as distributed Celery pipelines, one queue per stage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.add_typer(cache_app, name="cache")

JsonFlag = Annotated[bool, typer.Option("--json", help="print machine-readable JSON (the contracts' shapes)")]
StateDir = Annotated[Path, typer.Option(help="where logs and the stack's state file go")]
DEFAULT_STATE_DIR = Path(".stagecoach")
app.add_typer(monitor_app, name="monitor")
app.add_typer(tokens_app, name="tokens")
app.command("api")(api)


@app.callback()
def _root() -> None:
    """Stagecoach: multi-stage DSPy pipelines on per-stage Celery queues."""


def fail(message: str, code: int) -> NoReturn:
    render.err.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # text, not markup
    raise typer.Exit(code)


def _client() -> Any:
    from cli.jobs import BrokerUnreachable, client_settings, make_client

    try:
        return make_client(client_settings())
    except BrokerUnreachable as error:
        fail(str(error), EXIT_SERVICES)
    except StagecoachError as error:
        fail(f"cannot load the pipeline catalog: {error}", EXIT_INPUT)


def _settings(**overrides: Any) -> Any:
    """Settings from the environment; a bad value exits 2 naming the variable and the problem."""
    from pydantic import ValidationError

    from workers.settings import Settings

    try:
        return Settings(**overrides)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors())
        fail(f"bad settings: {problems}", EXIT_INPUT)


@app.command()
def up(
    workers: Annotated[str | None, typer.Option(help="worker processes per stage queue: retrieve=3,synthesize=2 "
                                                     "(default STAGECOACH_WORKERS, else 1 each)")] = None,
    autoscale: Annotated[str | None, typer.Option(
        help="Celery's pool autoscaling for these stages' workers, MIN..MAX processes: key_terms=1..8 (a prefork "
             "pool; default STAGECOACH_AUTOSCALE)")] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Run the local stack in the foreground: Redis (if none is reachable), the local LM server
    (when the default LM is in use), worker(s) per stage queue, the routing worker and Flower.
    The broker is Redis, or RabbitMQ with STAGECOACH_BROKER_URL=amqp://... (then Redis holds results).
    Ctrl-C stops all of it."""
    from cli.inputs import InputError
    from cli.stack import StackError, worker_counts
    from cli.up import parse_autoscale_option, parse_worker_counts
    from cli.up import up as run_up
    from contracts.catalog import load_catalog

    try:
        overrides: dict[str, Any] = {"workers": parse_worker_counts(workers)} if workers is not None else {}
        if autoscale is not None:
            overrides["autoscale"] = parse_autoscale_option(autoscale)
        settings = _settings(**overrides)
        worker_counts(load_catalog(settings.catalog), settings)  # an unknown stage: bad input, nothing started
    except (InputError, StackError, StagecoachError) as error:
        fail(str(error), EXIT_INPUT)
    try:
        raise typer.Exit(run_up(settings, state_dir))
    except (StackError, StagecoachError) as error:
        fail(str(error), EXIT_SERVICES)


@app.command()
def demo(
    pipeline: Annotated[list[str] | None, typer.Option("--pipeline", "-p", help="only these pipelines")] = None,
    keep: Annotated[bool, typer.Option(help="keep the stack running afterwards, until Ctrl-C")] = False,
    limit: Annotated[int, typer.Option(help="at most this many pipelines' examples")] = 12,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each job")] = 600.0,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Start the stack, run each pipeline's example, print answers with per-stage timings, stop."""
    from cli.demo import demo as run_demo
    from cli.stack import StackError
    from workers.settings import Settings

    try:
        raise typer.Exit(run_demo(Settings(), state_dir, pipeline or [], keep, limit, timeout))
    except UnknownPipelineError as error:
        fail(str(error), EXIT_INPUT)
    except (StackError, StagecoachError) as error:
        fail(str(error), EXIT_SERVICES)


@app.command()
def submit(
    pipeline: str,
    inputs: Annotated[list[str] | None, typer.Option("--input", "-i", help="NAME=VALUE (JSON if it parses)")] = None,
    input_file: Annotated[Path | None, typer.Option(help="JSON lines, one job's inputs per line")] = None,
    example: Annotated[bool, typer.Option("--example", help="use the pipeline's example input")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="wait for the result and print it")] = False,
    as_json: JsonFlag = False,
    timeout: Annotated[float, typer.Option(help="seconds --wait waits per job")] = 600.0,
    outputs: Annotated[list[str] | None, typer.Option(
        "--output", "-o", help="only this declared output (repeatable); stages feeding only others skip")] = None,
) -> None:
    """Submit a job (or one per line of --input-file) to PIPELINE (`name@version` pins a version)."""
    from cli import commands
    from routing.errors import BrokerUnavailableError

    client = _client()
    try:
        spec = client.runtime.catalog.pipeline(pipeline)
        if input_file is not None:
            if inputs or example or outputs:
                fail("--input-file cannot be combined with --input, --example or --output", EXIT_INPUT)
            raise typer.Exit(commands.submit_file(client, pipeline, input_file, wait, as_json, timeout))
        job_inputs = commands.gather_inputs(spec, inputs or [], example)
        handle = client.submit(pipeline, job_inputs, outputs=outputs or None)
    except BrokerUnavailableError as error:
        fail(str(error), EXIT_SERVICES)
    except (StagecoachError, ValueError) as error:
        fail(str(error), EXIT_INPUT)
    raise typer.Exit(commands.after_submit(handle, wait, as_json, timeout))


@app.command()
def status(job_id: str, as_json: JsonFlag = False) -> None:
    """Where a job is: queued, running (in which stage), succeeded or failed."""
    current = _client().status(job_id)
    if as_json:
        render.print_json(current.model_dump(mode="json"))
    else:
        render.out.print(render.status_table(current))
    if current.state == "unknown":
        fail(f"no job {job_id} (never submitted, or its record expired)", EXIT_PENDING)


@app.command()
def result(
    job_id: str,
    as_json: JsonFlag = False,
    wait: Annotated[bool, typer.Option("--wait", help="wait until the job finishes")] = False,
    timeout: Annotated[float, typer.Option(help="seconds --wait waits")] = 600.0,
) -> None:
    """A job's result: the answer, the error if it failed, per-stage timings."""
    from cli import commands

    raise typer.Exit(commands.show_result(_client(), job_id, wait, as_json, timeout))


@app.command()
def pipelines(as_json: JsonFlag = False) -> None:
    """Every pipeline in the catalog: its stages, node kinds and input fields."""
    from cli.catalog_view import describe_all, pipeline_kinds, pipeline_stages
    from contracts.catalog import load_catalog
    from workers.settings import Settings

    try:
        catalog = load_catalog(Settings().catalog)
    except StagecoachError as error:
        fail(f"cannot load the pipeline catalog: {error}", EXIT_INPUT)
    if as_json:
        render.print_json(describe_all(catalog))
        return
    rows = [(spec, pipeline_stages(catalog, spec), pipeline_kinds(catalog, spec))
            for _, spec in sorted(catalog.pipelines.items())]
    render.out.print(render.pipelines_table(rows))


@app.command("eval")
def eval_(
    pipeline: str,
    data: Annotated[Path | None, typer.Option(help="questions, JSON lines: HotPotQA records or {id, question, "
                                                   "answer, supporting_titles}")] = None,
    devset: Annotated[Path | None, typer.Option(help="the same as --data")] = None,
    versions: Annotated[str | None, typer.Option(help="compare versions in one run, e.g. 1,2")] = None,
    limit: Annotated[int | None, typer.Option(help="only the first N questions")] = None,
    concurrency: Annotated[int, typer.Option(help="jobs in flight at once")] = 8,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each job")] = 600.0,
    as_json: JsonFlag = False,
) -> None:
    """Score a QA pipeline on a question file through the running workers: exact match, token F1,
    supporting-title recall, latency p50/p95 per stage and per job, token usage; with --versions, each
    version side by side."""
    from cli.evaluate import answer_field_of, data_path, evaluate, evaluate_versions, report_view, versions_view
    from monitor.evaluation import load_examples

    source = data or devset
    if source is None:
        fail("give the questions with --data FILE (or --devset FILE)", EXIT_INPUT)
    client = _client()
    try:
        examples = load_examples(data_path(source), limit)
        if versions:
            chosen = [v.strip() for v in versions.split(",") if v.strip()]
            reports = evaluate_versions(client, pipeline, chosen, examples, concurrency, timeout,
                                        show_progress=not as_json)
            _print_versions(reports, as_json, versions_view)
            return
        fields = answer_field_of(client, pipeline)
        report = evaluate(client, pipeline, examples, concurrency, timeout, fields, show_progress=not as_json)
    except (StagecoachError, ValueError) as error:
        fail(str(error), EXIT_INPUT)
    if as_json:
        render.print_json(report.model_dump(mode="json"))
    else:
        render.out.print(report_view(report))
    if report.succeeded == 0 and report.questions:
        raise typer.Exit(EXIT_FAILED)


def _print_versions(reports: dict[str, Any], as_json: bool, view: Any) -> None:
    if as_json:
        render.print_json({version: report.model_dump(mode="json") for version, report in reports.items()})
    else:
        render.out.print(view(reports))
    if all(report.succeeded == 0 and report.questions for report in reports.values()):
        raise typer.Exit(EXIT_FAILED)


@app.command("optimize")
def optimize_(
    pipeline: str,
    trainset: Annotated[Path, typer.Option(help="training examples, JSON lines (the pipeline's inputs + labels)")],
    optimizer: Annotated[str, typer.Option(help="bootstrap | mipro | gepa | simba (DSPy's own)")] = "bootstrap",
    devset: Annotated[Path | None, typer.Option(help="development examples: MIPROv2/GEPA's valset, and the "
                                                     "score before and after")] = None,
    metric: Annotated[str, typer.Option(help="exact | f1 | module:function (a DSPy metric)")] = "exact",
    stage: Annotated[list[str] | None, typer.Option(help="optimise only this stage (repeatable); default: all")] = None,
    threads: Annotated[int, typer.Option(help="evaluation jobs in flight at once (the optimiser's num_threads)")] = 4,
    auto: Annotated[str, typer.Option(help="light | medium | heavy (MIPROv2, GEPA); 'none' with --trials")] = "light",
    seed: Annotated[int, typer.Option(help="the optimiser's seed")] = 9,
    max_demos: Annotated[int, typer.Option(help="bootstrapped demos per predictor")] = 4,
    max_labeled: Annotated[int, typer.Option(help="labelled demos per predictor")] = 4,
    trials: Annotated[int | None, typer.Option(help="MIPROv2: trials (with --candidates); SIMBA: steps")] = None,
    candidates: Annotated[int | None, typer.Option(help="MIPROv2/SIMBA: candidates")] = None,
    limit: Annotated[int | None, typer.Option(help="only the first N examples of each set")] = None,
    gold_field: Annotated[str, typer.Option(help="the label exact/f1 compare against")] = "answer",
    answer_field: Annotated[str | None, typer.Option(help="the pipeline output exact/f1 score; default: "
                                                          "one named like a label, else final_answer/answer")] = None,
    resume: Annotated[bool, typer.Option(help="replay the evaluations the journal holds (same seed)")] = False,
    journal: Annotated[Path | None, typer.Option(help="journal of finished evaluations; default under "
                                                      ".stagecoach/optimize/")] = None,
    traffic: Annotated[int, typer.Option(min=0, max=100, help="share (%) of unpinned jobs the new version gets")] = 0,
    out: Annotated[Path | None, typer.Option(help="folder for the new version's catalog file and states; "
                                                  "default: the first catalog folder")] = None,
    register_version: Annotated[bool, typer.Option("--register/--no-register",
                                                   help="register the result as a new pipeline version")] = True,
    job_timeout: Annotated[float, typer.Option(help="seconds one evaluation job may take")] = 600.0,
    as_json: JsonFlag = False,
) -> None:
    """Optimise a pipeline with DSPy's own optimiser running here, every evaluation of every candidate a job
    on the stage workers (`stagecoach up` must run); the winner is registered as a new version beside the old."""
    from cli.optimize import OptimizeProgress, catalog_folder, outcome_view
    from optimize.data import DataError, load_set, make_metric
    from optimize.data import answer_field as pick_answer
    from optimize.journal import Journal
    from optimize.optimizers import OPTIMIZERS, OptimizerOptions
    from optimize.register import register
    from optimize.run import default_journal, fleet_program, run_optimisation

    if optimizer not in OPTIMIZERS:
        fail(f"--optimizer '{optimizer}': use one of {', '.join(OPTIMIZERS)}", EXIT_INPUT)
    if auto not in ("light", "medium", "heavy", "none"):
        fail(f"--auto '{auto}': use light, medium, heavy or none", EXIT_INPUT)
    client = _client()
    catalog = client.runtime.catalog
    options = OptimizerOptions(optimizer=optimizer, threads=threads, auto=None if auto == "none" else auto,  # type: ignore[arg-type]
                               seed=seed, max_bootstrapped_demos=max_demos, max_labeled_demos=max_labeled,
                               trials=trials, candidates=candidates)
    try:
        spec = catalog.pipeline(pipeline)
        train = load_set(trainset, list(spec.inputs), limit)
        dev = load_set(devset, list(spec.inputs), limit) if devset else None
        scorer = make_metric(metric, answer_field or pick_answer(spec.outputs, train[0], gold_field), gold_field)
    except (StagecoachError, DataError) as error:
        fail(str(error), EXIT_INPUT)
    journal_path = journal or default_journal(DEFAULT_STATE_DIR, f"{spec.name}@{spec.version}", options)
    with OptimizeProgress(f"{spec.name}@{spec.version}", optimizer, enabled=not as_json) as progress:
        try:
            program, _ = fleet_program(client, pipeline, stage, Journal(journal_path, resume), job_timeout,
                                       progress.evaluation)
        except ValueError as error:
            fail(str(error), EXIT_INPUT)
        try:  # DSPy's optimisers print (and tqdm draws) to stdout: keep stdout for the result
            with contextlib.redirect_stdout(sys.stderr):
                outcome = run_optimisation(client, program, scorer, train, dev, options, progress.trial)
        except KeyboardInterrupt:
            program._fleet.stop()
            progress.__exit__(None, None, None)
            render.err.print(f"stopped: {program._fleet.jobs} evaluations finished and journalled in {journal_path}; "
                             f"run the same command with --resume to continue from them", soft_wrap=True)
            raise typer.Exit(130) from None
    registered = None
    unchanged = program.dump_state() == outcome.program.dump_state()  # no demo kept, no instruction changed
    if unchanged:
        render.err.print("the optimised program equals the one it started from: no new version registered",
                         soft_wrap=True)
    elif register_version:
        folder = out or catalog_folder(client.runtime.settings.catalog)
        registered = register(catalog, client.runtime.settings.catalog, spec, dict(outcome.program.stage_modules()),
                              folder, traffic)
    if as_json:
        render.print_json({**_optimize_json(outcome, registered), "unchanged": unchanged})
    else:
        render.out.print(outcome_view(outcome, registered, metric))


def _optimize_json(outcome: Any, registered: Any) -> dict[str, Any]:
    return {
        "seconds": outcome.seconds, "jobs": outcome.jobs, "replayed": outcome.replayed, "failed": outcome.failed,
        "usage": outcome.usage.model_dump(mode="json"), "baseline": outcome.baseline, "optimised": outcome.optimised,
        "trials": [vars(t) for t in outcome.trials],
        "stages": {name: module.dump_state() for name, module in outcome.program.stage_modules()},
        "registered": None if registered is None else {
            "pipeline": registered.pipeline, "version": registered.version, "base_version": registered.base_version,
            "file": str(registered.file), "stage_versions": registered.stage_versions,
            "states": {k: str(v) for k, v in registered.states.items()}},
    }


@app.command("compose")
def compose_file(
    env_example: Annotated[bool, typer.Option("--env-example", help="print .env.example (every setting)")] = False,
) -> None:
    """Print a docker-compose.yml for the catalog: Redis (or RabbitMQ), the local LM, routing, one worker
    per stage, Flower and the monitor; with --env-example, the .env.example it reads."""
    from cli.compose import env_example as render_env
    from cli.compose import render as render_compose
    from contracts.catalog import load_catalog

    if env_example:
        print(render_env(), end="")
        return
    settings = _settings()
    print(render_compose(load_catalog(settings.catalog), settings), end="")


@app.command("k8s")
def k8s_manifests(
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="write one file per service here (and kustomization.yaml); default: one YAML "
                               "stream on stdout")] = None,
    namespace: Annotated[str, typer.Option(help="namespace of every resource (kustomization)")] = "stagecoach",
    image: Annotated[str, typer.Option(help="the Stagecoach image (Dockerfile)")] = "stagecoach:latest",
    broker_url: Annotated[str, typer.Option(help="broker URL inside the cluster (no password: it comes from the "
                                                 "Secret)")] = "redis://redis:6379/0",
    result_backend: Annotated[str | None, typer.Option(help="Redis URL of the result backend inside the cluster; "
                                                            "default: the broker URL")] = None,
    sentinel_master: Annotated[str | None, typer.Option(help="with sentinel:// URLs: the master's name (default "
                                                             "STAGECOACH_SENTINEL_MASTER, mymaster)")] = None,
    sentinel_password: Annotated[bool, typer.Option(help="with sentinel:// URLs: the sentinels want a password of "
                                                         "their own (Secret key sentinel-password)")] = False,
) -> None:
    """Kubernetes manifests for the catalog: a Deployment, PodDisruptionBudget and KEDA ScaledObject per stage
    queue, the routing worker, watchdog, monitor, Flower and local LM with Services, a ConfigMap of the settings,
    Secret references; `kubectl apply -k DIR` (docs/deploy.md)."""
    from cli.k8s import K8sOptions, render, stream, write
    from contracts.catalog import load_catalog

    settings = _settings()
    options = K8sOptions(namespace=namespace, image=image, broker_url=broker_url, result_backend=result_backend,
                         sentinel_master=sentinel_master or settings.sentinel.master,
                         sentinel_password=sentinel_password)
    try:
        texts = render(load_catalog(settings.catalog), settings, options)
    except ValueError as error:
        fail(str(error), EXIT_INPUT)
    if output is None:
        print(stream(texts), end="")
        return
    removed = write(texts, output)
    render_out = f"wrote {len(texts)} files to {output}" + (f"; removed {', '.join(removed)}" if removed else "")
    print(render_out, file=sys.stderr)


@app.command("schema")
def schema(
    pipeline: str,
    part: Annotated[str, typer.Option(help="both | request | result (a plain JSON Schema)")] = "both",
) -> None:
    """JSON Schemas (draft 2020-12) of PIPELINE's request (the `pipeline.run` payload, typed inputs) and of
    its JobResult (answer and fields typed), so a service in any language can validate before it enqueues."""
    from cli.schema import schema_document
    from contracts.catalog import load_catalog

    if part not in ("both", "request", "result"):
        fail(f"--part {part!r}: use both, request or result", EXIT_INPUT)
    try:
        document = schema_document(load_catalog(_settings().catalog), pipeline, part)  # type: ignore[arg-type]
    except StagecoachError as error:
        fail(str(error), EXIT_INPUT)
    render.print_json(document)


@app.command("settings")
def settings_table(markdown: Annotated[bool, typer.Option(help="the README's markdown table")] = False) -> None:
    """Every setting: environment variable, type, default and meaning."""
    from cli import settings_doc

    if markdown:
        print(settings_doc.markdown())
        return
    render.out.print(render.rows_table("settings (environment variables)",
                                       ("variable", "type", "default", "meaning"), settings_doc.rows()))
    render.out.print(render.rows_table("effective values (derived from the settings above and the catalog)",
                                       ("value", "now", "from"), settings_doc.effective()))


def _redis_settings() -> Any:
    """Settings that reach the running stack's Redis: the result backend, where job records, checkpoints
    and dead letters live (exit 4 when it is down)."""
    from cli.jobs import client_settings
    from cli.stack import redis_reachable
    from routing.client import safe_url

    settings = client_settings()
    if not redis_reachable(settings.backend_url):
        fail(f"cannot reach Redis at {safe_url(settings.backend_url)}: start the stack with `stagecoach up` or set "
             "STAGECOACH_BROKER_URL", EXIT_SERVICES)
    return settings


@app.command("dead-letters")
def dead_letters(
    as_json: JsonFlag = False,
    limit: Annotated[int, typer.Option(help="newest N entries")] = 50,
) -> None:
    """Messages no worker could run (malformed, foreign serialiser, too big...), newest first, with the reason."""
    from cli.reliability import show_dead_letters, store

    show_dead_letters(store(_redis_settings()).entries(limit), as_json)


@app.command()
def replay(
    letter_id: Annotated[str, typer.Argument(help="dead letter id (a unique prefix is enough)")],
    queue: Annotated[str | None, typer.Option(help="push onto this queue instead of the original one")] = None,
) -> None:
    """Re-submit a dead letter: push its raw message back onto its queue and drop the entry."""
    from cli.reliability import ReplayError
    from cli.reliability import replay as replay_letter

    try:
        letter = replay_letter(_redis_settings(), letter_id, queue)
    except ReplayError as error:
        fail(str(error), EXIT_INPUT)
    render.out.print(f"replayed {letter.id} onto {queue or letter.queue}", highlight=False)


@app.command()
def cancel(job_id: str) -> None:
    """Stop a job: its next stage ends it as failed (cancelled); stages already running finish first."""
    from cli.reliability import recovery
    from routing.recovery import RecoveryError

    try:
        recovery(_redis_settings()).cancel(job_id)
    except RecoveryError as error:
        fail(str(error), EXIT_PENDING)
    render.out.print(f"job {job_id} cancelled", highlight=False)


@app.command()
def resume(job_id: str) -> None:
    """Continue a failed job from its checkpoint: completed stages are replayed, not run (no LM calls)."""
    from cli.reliability import recovery
    from routing.recovery import RecoveryError

    try:
        generation = recovery(_redis_settings()).resume(job_id)
    except RecoveryError as error:
        fail(str(error), EXIT_PENDING)
    render.out.print(f"job {job_id} resumed (generation {generation}); `stagecoach result {job_id} --wait`",
                     highlight=False)


@app.command()
def watchdog(
    interval: Annotated[float | None, typer.Option(help="seconds between sweeps; default STAGECOACH_WATCHDOG_INTERVAL")]
    = None,
    once: Annotated[bool, typer.Option("--once", help="one sweep, then exit")] = False,
) -> None:
    """Re-dispatch jobs that made no progress past their stage deadline (lost messages, killed workers)."""
    import redis
    from kombu.exceptions import OperationalError

    from cli.jobs import client_settings
    from cli.reliability import watch

    settings = client_settings()  # no reachability check: the loop waits out a broker that is down
    try:
        watch(settings, interval or settings.watchdog_interval, once)
    except KeyboardInterrupt:
        return
    except (redis.RedisError, OperationalError) as error:  # only with --once (a health check): the loop waits
        fail(f"watchdog: Redis unavailable ({error})", EXIT_SERVICES)


@app.command()
def trace(
    job_id: Annotated[str | None, typer.Argument(help="the job (from the monitor's store)")] = None,
    save: Annotated[Path | None, typer.Option(help="write the trace as JSON to this file")] = None,
    replay: Annotated[Path | None, typer.Option(help="re-run a saved trace's job; compare the paths")] = None,
    as_json: JsonFlag = False,
    timeout: Annotated[float, typer.Option(help="seconds --replay waits for the job")] = 600.0,
) -> None:
    """A job's trace as a tree: each node's start and end, inputs and outputs, timings, retries, errors,
    branch decisions, loop iterations and map items (recorded by `stagecoach monitor`)."""
    from cli import trace_cmd
    from cli.monitor_cmd import settings
    from monitor.store import Store
    from monitor.trace import build, path_of

    if replay is not None:
        try:
            saved = trace_cmd.load(replay)
            pipeline, inputs, path = trace_cmd.replay_request(saved)
            handle = _client().submit(pipeline, inputs)
        except StagecoachError as error:
            fail(str(error), EXIT_INPUT)
        differences = trace_cmd.compare(path, path_of(handle.get(timeout)))
        render.out.print(f"replayed job {saved.job_id} as {handle.id}: "
                         + ("same path" if not differences else "[red]different path[/]"), highlight=False)
        for line in differences:
            render.out.print(f"  {line}", highlight=False)
        raise typer.Exit(EXIT_FAILED if differences else 0)
    if job_id is None:
        fail("give a JOB id, or --replay FILE", EXIT_INPUT)
    events = Store.connect(settings()).trace(job_id)
    if not events:
        fail(f"no trace of job {job_id} (was `stagecoach monitor` running? traces expire)", EXIT_PENDING)
    found = build(job_id, events)
    if save is not None:
        trace_cmd.save(found, save)
    if as_json:
        render.print_json(found.model_dump(mode="json"))
    else:
        render.out.print(trace_cmd.tree(found))


@app.command()
def graph(
    pipeline: str,
    fmt: Annotated[str, typer.Option("--format", help="mermaid | dot | svg | png")] = "mermaid",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write here instead of stdout")] = None,
) -> None:
    """A pipeline's node tree as Mermaid text, or drawn by Graphviz (svg, png): the monitor page's drawing."""
    import sys

    from contracts.catalog import load_catalog
    from monitor.graph import build as build_graph
    from monitor.graph import render as render_graph
    from workers.settings import Settings

    try:
        drawing = render_graph(build_graph(load_catalog(Settings().catalog), pipeline), fmt)
    except (StagecoachError, ValueError) as error:
        fail(str(error), EXIT_INPUT)
    if output is not None:
        output.write_bytes(drawing)
    elif fmt == "png":
        fail("--format png writes binary: give --output FILE", EXIT_INPUT)
    else:
        sys.stdout.buffer.write(drawing)


def main() -> None:
    app()
