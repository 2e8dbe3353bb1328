"""How the default local model is best asked: every way measured on the project's own questions and tasks.

`python -m bench --only answers` (`make bench BENCH_ARGS=--only answers`) starts the bundled
SmolLM2-135M-Instruct server (`workers.local_lm`) and asks it, through DSPy, the questions and
pipeline tasks of `bench/answers.yaml` in every way listed in `VARIANTS`: DSPy's ChatAdapter,
JSONAdapter and TwoStepAdapter, the schema-constrained adapter (as it was, with the fields described,
with the answer before the reasoning), plain text read into the contract, two-step with a
schema-constrained extraction, the plain-first adapter, and the plain-first adapter with few-shot
demos compiled by `dspy.BootstrapFewShot` on the training questions (saved as stage state and loaded
back, as a worker would). Each item runs the stage's own module (signature or module class), at
temperature 0 with DSPy's cache off and the stages' default `max_tokens`.

Reported per variant: factual accuracy (an accepted answer in `answer`), tasks passed (every check
of every output field), parse failures (no output in the contract: a parse error, a reply cut at
max_tokens or looping), and seconds per stage call and per LM call. The items of every variant are
interleaved on a pool of `CONCURRENCY` threads (the server decodes that many at once), so a busy
shared machine slows every variant alike; seconds are wall time, under that load. A variant whose
first `GIVE_UP_AFTER` items all fail (a parse failure, or the LM timing out while it runs on to
max_tokens, takes minutes per item here) is stopped there: its figures are over the items it ran, and the
notes say so. Every other variant is asked every question and every task of its shapes.

    python -m bench.answers [--variants plain_first,schema] [--limit 10]   # a quick look, no files written
"""

import argparse
import math
import re
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy
import yaml
from dspy.utils.exceptions import AdapterParseError
from dspy.utils.usage_tracker import track_usage

from bench.harness import Bench, Ratio, Scale, ScenarioResult, Series, Table
from cli.fleet import ROOT, local_lm_server
from workers.adapters import PlainFirstAdapter, PlainTextAdapter, ReplyError, SchemaJSONAdapter
from workers.settings import LOCAL_MODEL, LMSettings

DATA = ROOT / "bench" / "answers.yaml"
CONCURRENCY = 4
GIVE_UP_AFTER = 4
SOLVER = "examples.ensemble:Solve"  # the factual questions' stage shape (ensemble_qa's solver; qa's answer)
SMOKE_FACTUAL, SMOKE_TASKS = 3, ["define-glacier", "key-terms-france"]
SMOKE_VARIANTS = ["schema", "plain_first"]
DEFAULT = "plain_first"
SIGNIFICANCE = 0.05  # a variant beats the default when a paired exact test on the same items says so at this level


class TwoStepSchemaAdapter(dspy.TwoStepAdapter):
    """DSPy's two-step adapter (a free reply, then an extraction call) with the extraction decoded
    under the JSON schema instead of DSPy's ChatAdapter format."""

    def parse(self, signature: Any, completion: str) -> dict[str, Any]:
        extractor = self._create_extractor_signature(signature)
        values: list[dict[str, Any]] = SchemaJSONAdapter()(self.extraction_model, {}, extractor, [],
                                                           {"text": completion})
        return values[0]


@dataclass(frozen=True)
class Variant:
    """A way of asking. `factual_limit`: only the first questions (0: none, for a variant whose prompt differs
    only on other shapes); `shapes`: only items of these stage shapes (elsewhere its prompt is another's)."""

    label: str
    adapter: Callable[[dspy.LM], dspy.Adapter]
    few_shot: bool = False
    factual_limit: int | None = None
    shapes: frozenset[str] | None = None

    def runs(self, item: "Item", index: int) -> bool:
        if item.factual:
            return self.factual_limit is None or index < self.factual_limit
        return not self.few_shot and (self.shapes is None or shape_of(item) in self.shapes)


CHAIN = frozenset({"chain of thought"})
VARIANTS: dict[str, Variant] = {
    "chat": Variant("DSPy ChatAdapter", lambda lm: dspy.ChatAdapter(use_json_adapter_fallback=False)),
    "json": Variant("DSPy JSONAdapter", lambda lm: dspy.JSONAdapter()),
    "two_step": Variant("DSPy TwoStepAdapter (ChatAdapter extraction)", lambda lm: dspy.TwoStepAdapter(lm)),
    "schema": Variant("schema-constrained JSON (the old default)", lambda lm: SchemaJSONAdapter()),
    "schema_described": Variant("schema, each field's description in prompt and schema",
                                lambda lm: SchemaJSONAdapter(describe=True)),
    "schema_answer_first": Variant("schema, answer before reasoning (chain-of-thought stages only: elsewhere "
                                   "the same prompt as schema)", lambda lm: SchemaJSONAdapter(answer_first=True),
                                   factual_limit=0, shapes=CHAIN),
    "plain": Variant("plain text parsed into the contract", lambda lm: PlainTextAdapter()),
    "two_step_schema": Variant("two-step: free reply, schema-constrained extraction",
                               lambda lm: TwoStepSchemaAdapter(lm)),
    "plain_first": Variant("plain first: first text field plain, the rest schema", lambda lm: PlainFirstAdapter()),
    "plain_first_few_shot": Variant("plain first + BootstrapFewShot demos (questions only)",
                                    lambda lm: PlainFirstAdapter(), few_shot=True),
}


@dataclass(frozen=True)
class Item:
    id: str
    module: str
    inputs: dict[str, Any]
    checks: dict[str, dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)
    factual: bool = False


@dataclass
class Outcome:
    variant: str
    item: Item
    seconds: float
    lm_calls: int
    passed: bool = False
    parse_failure: bool = False
    error: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)


def load_items(path: Path = DATA) -> tuple[list[Item], list[Item], list[dict[str, Any]]]:
    """(factual test items, task items, factual training questions)."""
    data = yaml.safe_load(path.read_text())
    factual = [Item(f"factual-{i + 1}", SOLVER, {"question": q["q"], "persona": ""},
                    {"answer": {"any": q["accept"]}}, factual=True) for i, q in enumerate(data["factual"]["test"])]
    tasks = [Item(t["id"], t["module"], t["inputs"], t["checks"], t.get("options", {})) for t in data["tasks"]]
    return factual, tasks, data["factual"]["train"]


# --- scoring --------------------------------------------------------------------------------------------


def mentions(text: str, word: str) -> bool:
    """`word` in `text` as a whole word or phrase, ignoring case."""
    return re.search(rf"(?<![\w]){re.escape(word.lower())}(?![\w])", text.lower()) is not None


def failed_checks(outputs: dict[str, Any], checks: dict[str, dict[str, Any]]) -> list[str]:
    """Which checks the outputs fail (empty: a sensible answer)."""
    problems = []
    for name, rule in checks.items():
        value = outputs.get(name)
        text = " ".join(map(str, value)) if isinstance(value, list) else str(value or "")
        if not text.strip():
            problems.append(f"{name}: empty")
            continue
        if "{" in text or "}" in text:  # a JSON object or template copied into a field is no answer
            problems.append(f"{name}: JSON or template markup")
        if "any" in rule and not any(mentions(text, w) for w in rule["any"]):
            problems.append(f"{name}: none of {rule['any']}")
        problems += [f"{name}: lacks {w!r}" for w in rule.get("all", []) if not mentions(text, w)]
        problems += [f"{name}: has {w!r}" for w in rule.get("none", []) if w in text]
        if "equals" in rule and str(value) != rule["equals"]:
            problems.append(f"{name}: {value!r} is not {rule['equals']!r}")
        if "items" in rule and not (isinstance(value, list) and rule["items"][0] <= len(value) <= rule["items"][1]):
            problems.append(f"{name}: {len(value) if isinstance(value, list) else 'no'} items, not {rule['items']}")
        if len(text.split()) < rule.get("min_words", 0):
            problems.append(f"{name}: fewer than {rule['min_words']} words")
        if isinstance(value, list) and any(len(str(v).split()) > rule.get("item_words", 1000) for v in value):
            problems.append(f"{name}: an item longer than {rule['item_words']} words")
    return problems


# --- running ----------------------------------------------------------------------------------------------


_shapes: dict[str, str] = {}


def shape_of(item: Item) -> str:
    """The stage shape an item exercises, from its module's signature."""
    if item.id not in _shapes:
        _shapes[item.id] = _shape(item)
    return _shapes[item.id]


def _shape(item: Item) -> str:
    if item.factual:
        return "factual: text + number"
    signatures = [predictor.signature for predictor in program_for(item).predictors()]
    if any("reasoning" in signature.output_fields for signature in signatures):
        return "chain of thought"
    outputs = [f.annotation for f in signatures[0].output_fields.values()]
    if outputs[0] is str:
        return "one text" if len(outputs) == 1 else "text + more"
    return "list" if getattr(outputs[0], "__origin__", None) is list else "choice"


def program_for(item: Item) -> dspy.Module:
    """The stage's module as a worker builds it: a signature becomes Predict, a class is instantiated."""
    module_name, _, attr = item.module.partition(":")
    target = getattr(__import__(module_name, fromlist=[attr]), attr)
    if isinstance(target, type) and issubclass(target, dspy.Signature):
        return dspy.Predict(target)
    program: dspy.Module = target(**item.options)
    return program


def run_item(lm: dspy.LM, adapter: dspy.Adapter, program: dspy.Module, variant: str, item: Item) -> Outcome:
    started = time.perf_counter()
    with track_usage() as usage, dspy.context(lm=lm, adapter=adapter):
        try:
            prediction = program(**item.inputs)
            error, parse_failure = "", False
        except (AdapterParseError, ReplyError, ValueError) as failure:
            prediction, error, parse_failure = None, _short(failure), True
        except Exception as failure:  # an LM or server error: reported, not a parse failure
            prediction, error, parse_failure = None, _short(failure), False
    seconds = time.perf_counter() - started
    calls = sum(len(entries) for entries in usage.usage_data.values())
    outcome = Outcome(variant, item, seconds, calls, parse_failure=parse_failure, error=error)
    if prediction is not None:
        outcome.outputs = {name: prediction.get(name) for name in item.checks}
        problems = failed_checks(outcome.outputs, item.checks)
        outcome.passed, outcome.error = not problems, "; ".join(problems)
    return outcome


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"


def compile_few_shot(lm: dspy.LM, train: list[dict[str, Any]], state_dir: Path) -> Path:
    """BootstrapFewShot on the training questions with the plain-first adapter; the compiled solver's
    state saved as a stage's `state` file would be (and loaded back by the caller)."""
    trainset = [dspy.Example(question=q["q"], persona="", accept=q["accept"]).with_inputs("question", "persona")
                for q in train]

    def correct(example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> bool:
        return any(mentions(str(prediction.get("answer") or ""), w) for w in example.accept)

    optimiser = dspy.BootstrapFewShot(metric=correct, max_bootstrapped_demos=3, max_labeled_demos=0)
    with dspy.context(lm=lm, adapter=PlainFirstAdapter()):
        compiled = optimiser.compile(program_for(Item("solver", SOLVER, {}, {})), trainset=trainset)
    path = state_dir / "solver_few_shot.json"
    compiled.save(str(path))
    return path


class Runner:
    """Runs every (variant, item) pair on a thread pool, interleaved, giving up on hopeless variants."""

    def __init__(self, lm: dspy.LM, variants: list[str], few_shot_state: Path | None) -> None:
        self.lm = lm
        self.variants = variants
        self.few_shot_state = few_shot_state
        self.outcomes: list[Outcome] = []
        self.given_up: set[str] = set()
        self._lock = threading.Lock()
        self._local = threading.local()

    def run(self, items: list[Item]) -> list[Outcome]:
        """Questions and tasks alternate, so the first items of a variant are of every shape."""
        factual, tasks = [i for i in items if i.factual], [i for i in items if not i.factual]
        mixed = [item for pair in zip(factual, tasks, strict=False) for item in pair]
        mixed += factual[len(tasks):] + tasks[len(factual):]
        index = {item.id: n for n, item in enumerate(factual)}
        pairs = [(v, item) for item in mixed for v in self.variants if VARIANTS[v].runs(item, index.get(item.id, 0))]
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(lambda pair: self._one(*pair), pairs))
        return self.outcomes

    def _one(self, variant: str, item: Item) -> None:
        if variant in self.given_up:
            return
        outcome = run_item(self.lm, VARIANTS[variant].adapter(self.lm), self._program(variant, item), variant, item)
        with self._lock:
            self.outcomes.append(outcome)
            mine = [o for o in self.outcomes if o.variant == variant]
            if len(mine) == GIVE_UP_AFTER and not any(o.passed for o in mine):
                self.given_up.add(variant)
        print(f"[answers] {variant:22} {item.id:26} {outcome.seconds:6.1f}s "
              f"{'ok  ' if outcome.passed else 'PARSE' if outcome.parse_failure else 'miss '} "
              f"{_show(outcome)}", flush=True)

    def _program(self, variant: str, item: Item) -> dspy.Module:
        program = program_for(item)
        if VARIANTS[variant].few_shot and self.few_shot_state is not None:
            program.load(str(self.few_shot_state))
        return program


def _show(outcome: Outcome) -> str:
    shown = outcome.outputs if outcome.passed else {"error": outcome.error, **outcome.outputs}
    return " ".join(str(shown).split())[:150]


# --- the scenario -------------------------------------------------------------------------------------------


@dataclass
class Figures:
    """One variant's figures over the items it ran."""

    factual: list[Outcome]
    tasks: list[Outcome]

    @property
    def all(self) -> list[Outcome]:
        return self.factual + self.tasks

    def accuracy(self) -> float:
        return 100 * sum(o.passed for o in self.factual) / len(self.factual) if self.factual else 0.0

    def task_rate(self) -> float:
        return 100 * sum(o.passed for o in self.tasks) / len(self.tasks) if self.tasks else 0.0

    def parse_failures(self) -> int:
        return sum(o.parse_failure for o in self.all)

    def seconds_per_call(self) -> float:
        return sum(o.seconds for o in self.all) / max(1, sum(o.lm_calls for o in self.all))


def figures_of(outcomes: list[Outcome], variant: str) -> Figures:
    mine = [o for o in outcomes if o.variant == variant]
    return Figures([o for o in mine if o.item.factual], [o for o in mine if not o.item.factual])


def run(bench: Bench, scale: Scale) -> ScenarioResult:
    smoke = scale.name == "smoke"
    variants = SMOKE_VARIANTS if smoke else list(VARIANTS)
    factual, tasks, train = load_items()
    if smoke:
        factual, tasks = factual[:SMOKE_FACTUAL], [t for t in tasks if t.id in SMOKE_TASKS]
    outcomes, given_up = measure(variants, factual + tasks, train)
    return result(outcomes, variants, len(factual), len(tasks), given_up)


def measure(variants: list[str], items: list[Item], train: list[dict[str, Any]]) -> tuple[list[Outcome], set[str]]:
    """Start the local model, compile the few-shot demos if asked for, and run every pair: the outcomes,
    and the variants given up on."""
    with local_lm_server() as url:
        settings = LMSettings(model=LOCAL_MODEL, api_base=url, cache=False)
        lm = dspy.LM(settings.model, api_base=url, api_key=settings.api_key, temperature=settings.temperature,
                     max_tokens=settings.max_tokens, cache=False, num_retries=0, timeout=settings.timeout)
        state = None
        if any(VARIANTS[v].few_shot for v in variants):
            state = compile_few_shot(lm, train, Path(tempfile.mkdtemp(prefix="stagecoach-answers-")))
        runner = Runner(lm, variants, state)
        return runner.run(items), runner.given_up


def result(outcomes: list[Outcome], variants: list[str], n_factual: int, n_tasks: int,
           given_up: set[str]) -> ScenarioResult:
    figures = {v: figures_of(outcomes, v) for v in variants}
    series = [Series(f"{v}: seconds per stage call", "s", [[o.seconds for o in figures[v].all]])
              for v in variants if figures[v].all]
    default = figures[DEFAULT] if DEFAULT in figures else next(iter(figures.values()))
    best_accuracy = max(f.accuracy() for f in figures.values())
    best_tasks = max(f.task_rate() for f in figures.values())
    better = [v for v in variants if v != DEFAULT and DEFAULT in figures and measurably_better(outcomes, v, DEFAULT)]
    ratios = [Ratio("default (plain first): factual accuracy, %", _one(default.accuracy(), "%"), None),
              Ratio("default (plain first): tasks passed, %", _one(default.task_rate(), "%"), None),
              Ratio("default factual accuracy / best variant's", _one(default.accuracy(), "%"),
                    _one(best_accuracy or 1.0, "%")),
              Ratio("default tasks passed / best variant's", _one(default.task_rate(), "%"),
                    _one(best_tasks or 1.0, "%")),
              Ratio(f"variants measurably better than the default (paired exact test, p < {SIGNIFICANCE})",
                    _one(len(better), "variants"), None, 0.0, "lower"),
              Ratio("default: seconds per LM call", _one(default.seconds_per_call(), "s"), None)]
    table = Table("Each way of asking SmolLM2-135M, on the same items",
                  ["variant", "how", "factual correct", "tasks passed", "parse failures", "LM errors",
                   "s per stage call", "LM calls per stage call", "s per LM call"],
                  [_row(v, figures[v]) for v in variants])
    shapes = sorted({shape_of(o.item) for o in outcomes})
    by_shape = Table("Passed per stage shape (parse failures in brackets)", ["variant", *shapes],
                     [[v, *[_shape_cell(figures[v].all, shape) for shape in shapes]] for v in variants])
    misses = Table("Items the default got wrong, and what it said", ["item", "problem", "outputs"],
                   [[o.item.id, o.error, _clip(o.outputs)] for o in default.all if not o.passed])
    notes = [f"{v} stopped after its first {GIVE_UP_AFTER} items all failed" for v in variants
             if v in given_up]
    notes += [f"{v} against the default on the items both ran: {paired_line(outcomes, v, DEFAULT)}"
              for v in variants if v != DEFAULT and DEFAULT in figures]
    notes.append(f"{CONCURRENCY} calls in flight at once (the local server decodes them together): seconds are "
                 "wall time, the load average is in the report header")
    return ScenarioResult("answers", "Answers of the default local model (SmolLM2-135M), each way of asking",
                          {"model": LOCAL_MODEL, "factual_questions": n_factual, "tasks": n_tasks,
                           "variants": len(variants), "concurrency": CONCURRENCY,
                           "max_tokens": LMSettings().max_tokens, "temperature": 0.0},
                          series, ratios, notes, [table, by_shape, misses])


def discordant(outcomes: list[Outcome], variant: str, baseline: str) -> tuple[int, int]:
    """On the items both ran: how many only `variant` passed, and how many only `baseline` passed."""
    passed: dict[tuple[str, str], bool] = {(o.variant, o.item.id): o.passed for o in outcomes}
    shared = [item for (v, item) in passed if v == variant and (baseline, item) in passed]
    only_variant = sum(1 for i in shared if passed[(variant, i)] and not passed[(baseline, i)])
    only_baseline = sum(1 for i in shared if passed[(baseline, i)] and not passed[(variant, i)])
    return only_variant, only_baseline


def exact_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test (McNemar's exact test) on the discordant items: the chance of a split at
    least this uneven if both ways were equally good. Same items, so a few lucky decodes are not a win."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / (1 << n)
    return min(1.0, 2 * tail)


def measurably_better(outcomes: list[Outcome], variant: str, baseline: str) -> bool:
    wins, losses = discordant(outcomes, variant, baseline)
    return wins > losses and exact_p(wins, losses) < SIGNIFICANCE


def paired_line(outcomes: list[Outcome], variant: str, baseline: str) -> str:
    wins, losses = discordant(outcomes, variant, baseline)
    return f"{wins} passed only by {variant}, {losses} only by the default (exact p = {exact_p(wins, losses):.2g})"


def _one(value: float, unit: str) -> Series:
    return Series("value", unit, [[value]])


def _row(variant: str, f: Figures) -> list[str]:
    stage_calls = len(f.all)
    return [variant, VARIANTS[variant].label,
            f"{sum(o.passed for o in f.factual)}/{len(f.factual)} ({f.accuracy():.0f}%)",
            f"{sum(o.passed for o in f.tasks)}/{len(f.tasks)}" if f.tasks else "not run",
            f"{f.parse_failures()}/{stage_calls}",
            str(sum(1 for o in f.all if not o.outputs and not o.parse_failure)),
            f"{sum(o.seconds for o in f.all) / max(1, stage_calls):.1f}",
            f"{sum(o.lm_calls for o in f.all) / max(1, stage_calls):.1f}",
            f"{f.seconds_per_call():.1f}"]


def _shape_cell(outcomes: list[Outcome], shape: str) -> str:
    mine = [o for o in outcomes if shape_of(o.item) == shape]
    if not mine:
        return "not run"
    return f"{sum(o.passed for o in mine)}/{len(mine)} ({sum(o.parse_failure for o in mine)})"


def _clip(outputs: dict[str, Any]) -> str:
    return " ".join(str(outputs).replace("|", "/").split())[:140]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A quick look at a few variants (writes no files).")
    parser.add_argument("--variants", default=DEFAULT)
    parser.add_argument("--limit", type=int, default=10, help="factual questions (tasks: all)")
    parser.add_argument("--tasks", default="", help="comma-separated task ids (default: all)")
    args = parser.parse_args(argv)
    factual, tasks, train = load_items()
    chosen = [t for t in tasks if not args.tasks or t.id in args.tasks.split(",")]
    variants = args.variants.split(",")
    outcomes, given_up = measure(variants, factual[:args.limit] + chosen, train)
    shown = result(outcomes, variants, args.limit, len(chosen), given_up)
    for table in shown.tables:
        print(f"\n{table.title}:\n" + "\n".join(" | ".join(row) for row in [table.columns, *table.rows]))


if __name__ == "__main__":
    main()
