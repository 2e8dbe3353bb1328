"""DSPy's own optimisers, built and run unchanged: the same code tunes the fleet's proxy program and,
in tests and benchmarks, an ordinary in-process program, so the two can be compared."""

from dataclasses import dataclass
from typing import Any, Literal

import dspy
from dspy.utils.callback import BaseCallback

OptimizerName = Literal["bootstrap", "mipro", "gepa", "simba"]
OPTIMIZERS: tuple[str, ...] = ("bootstrap", "mipro", "gepa", "simba")
Auto = Literal["light", "medium", "heavy"]


@dataclass(frozen=True)
class OptimizerOptions:
    optimizer: OptimizerName = "bootstrap"
    threads: int = 4  # evaluations in flight at once (the optimiser's num_threads)
    auto: Auto | None = "light"
    seed: int = 9
    max_bootstrapped_demos: int = 4
    max_labeled_demos: int = 4
    max_rounds: int = 1
    trials: int | None = None  # mipro with auto=None: trials and candidates
    candidates: int | None = None
    max_errors: int | None = None
    minibatch_size: int = 35


def compile_program(student: dspy.Module, metric: Any, trainset: list[dspy.Example],
                    devset: list[dspy.Example] | None, options: OptimizerOptions) -> dspy.Module:
    """`optimizer.compile(student, ...)` for the chosen optimiser, under the caller's dspy.context (LM,
    adapter): exactly the call a user of DSPy would write."""
    name = options.optimizer
    if name == "bootstrap":
        bootstrap = dspy.BootstrapFewShot(metric=metric, max_bootstrapped_demos=options.max_bootstrapped_demos,
                                          max_labeled_demos=options.max_labeled_demos, max_rounds=options.max_rounds,
                                          max_errors=options.max_errors)
        return bootstrap.compile(student, trainset=trainset)
    if name == "mipro":
        return _mipro(student, metric, trainset, devset, options)
    if name == "gepa":
        gepa = dspy.GEPA(metric=GepaMetric(metric), auto=options.auto, reflection_lm=dspy.settings.lm,
                         num_threads=options.threads, seed=options.seed, max_metric_calls=None
                         if options.auto else (options.trials or 50))
        return gepa.compile(student, trainset=trainset, valset=devset)
    if name == "simba":
        simba = dspy.SIMBA(metric=metric, bsize=min(32, len(trainset)), num_threads=options.threads,
                           max_demos=options.max_bootstrapped_demos,
                           max_steps=options.trials or 8, num_candidates=options.candidates or 6)
        return simba.compile(student, trainset=trainset, seed=options.seed)
    raise ValueError(f"unknown optimiser '{name}'; use one of {', '.join(OPTIMIZERS)}")


def _mipro(student: dspy.Module, metric: Any, trainset: list[dspy.Example], devset: list[dspy.Example] | None,
           options: OptimizerOptions) -> dspy.Module:
    explicit = options.trials is not None or options.candidates is not None
    mipro = dspy.MIPROv2(metric=metric, auto=None if explicit else options.auto,
                         num_candidates=options.candidates if explicit else None, num_threads=options.threads,
                         max_errors=options.max_errors, seed=options.seed,
                         max_bootstrapped_demos=options.max_bootstrapped_demos,
                         max_labeled_demos=options.max_labeled_demos)
    valset = devset if devset is not None else None
    size = len(valset) if valset is not None else max(1, int(len(trainset) * 0.8))
    return mipro.compile(student, trainset=trainset, valset=valset, seed=options.seed,
                         num_trials=options.trials if explicit else None,
                         minibatch_size=min(options.minibatch_size, size))


class GepaMetric:
    """GEPA calls its metric with (gold, pred, trace, pred_name, pred_trace); a DSPy metric takes three."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric

    def __call__(self, gold: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None) -> Any:
        return self.metric(gold, pred, trace)


@dataclass
class Trial:
    """One evaluation of a candidate program over a set (what DSPy's Evaluate reports)."""

    number: int
    score: float | None
    examples: int
    kind: str  # full / minibatch / evaluation


TRIAL_KINDS = {"eval_full": "full", "eval_minibatch": "minibatch", "devset": "devset"}  # by callback metadata


class TrialRecorder(BaseCallback):
    """Every `dspy.Evaluate` call the optimiser makes, with its score: MIPROv2's and GEPA's trials."""

    def __init__(self, on_trial: Any = None) -> None:
        self.trials: list[Trial] = []
        self._started: dict[str, tuple[int, str]] = {}
        self.on_trial = on_trial

    def on_evaluate_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        devset = inputs.get("devset") or getattr(instance, "devset", None) or []
        metadata = inputs.get("callback_metadata") or {}
        kind = TRIAL_KINDS.get(str(metadata.get("metric_key")), "evaluation")
        self._started[call_id] = (len(devset), kind)

    def on_evaluate_end(self, call_id: str, outputs: Any | None, exception: BaseException | None = None) -> None:
        examples, kind = self._started.pop(call_id, (0, "evaluation"))
        score = getattr(outputs, "score", None) if outputs is not None else None
        trial = Trial(len(self.trials) + 1, float(score) if score is not None else None, examples, kind)
        self.trials.append(trial)
        if self.on_trial is not None:
            self.on_trial(trial)
