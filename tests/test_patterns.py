"""Runtime-decided structure on real workers: branch, loop, sub-pipeline, adaptive, combinations.

Drafts grow by a known amount per refinement with the test LM (`draft_next of <draft>`, the
subject cut to 60 characters) and `score_draft` scores length/100, so loop scores are exact.
"""

from contracts.jobs import JobResult
from routing.client import Client


def _lm(field: str, text: str) -> str:
    """What the test LM answers for a string field when `text` is the first input."""
    subject = " ".join(text.split())
    subject = subject if len(subject) <= 60 else subject[:57] + "..."
    return f"{field} of <{subject}>"


def _refined(text: str) -> str:
    """What the test LM's `refine` makes of a draft."""
    return _lm("draft_next", text)


def _decisions(result: JobResult, kind: str) -> list[tuple[str, str]]:
    return [(d.node, d.choice) for d in result.trail if d.kind == kind]


# --- branch ---------------------------------------------------------------------------------------

def test_branch_routes_on_the_router_output_and_records_it(client: Client) -> None:
    question = "Write an essay on why the Roman Empire fell."
    result = client.submit("patterns_branch", {"question": question}).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.answer == {"task_type": "essay", "answer": f"answer of <{question}>"}
    assert [t.node for t in result.timings] == ["route/classify_task", "route/essay/essay"]
    assert result.outputs["route/classify_task"] == {"task_type": "essay"}
    assert result.outputs["route"] == {"branch": "essay", "field": "task_type", "value": "essay", "defaulted": False}
    assert _decisions(result, "branch") == [("route", "essay")]


def test_branch_into_a_named_subpipeline(client: Client) -> None:
    question = "Which multiple choice option names the largest planet?"
    result = client.submit("patterns_branch", {"question": question}).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.answer["task_type"] == "multiple_choice"
    assert [t.node for t in result.timings] == [
        "route/classify_task", "route/multiple_choice/qa/key_terms", "route/multiple_choice/qa/answer"]


def test_branch_normalises_case_and_spaces(client: Client) -> None:
    result = client.submit("t_branch_field", {"mode": "  Short-Answer ", "question": "Why?"}).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.outputs["pick"]["branch"] == "short_answer"
    assert result.outputs["pick"]["value"] == "  Short-Answer "
    assert [t.stage for t in result.timings] == ["short_answer", "key_terms"]  # remainder ran, in order


def test_unknown_branch_fails_clearly_and_does_not_hang(client: Client) -> None:
    result = client.submit("t_branch_field", {"mode": "poetry", "question": "Why?"}).get(timeout=30)
    assert result.state == "failed"
    assert result.error is not None
    assert result.error.kind == "routing"
    assert result.error.error_type == "RoutingError"
    assert result.error.node == "pick"
    assert "'poetry'" in result.error.message
    assert "known branches: essay, short_answer" in result.error.message
    assert result.timings == []  # the stage after the branch was passed through


def test_unknown_branch_takes_the_default(client: Client) -> None:
    result = client.submit("t_branch_default", {"mode": "poetry", "question": "Why?"}).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.answer["answer"] == "answer of <Why?>"
    assert result.trail[0].detail["defaulted"] is True


# --- loop -----------------------------------------------------------------------------------------

def test_loop_stops_at_the_threshold(client: Client) -> None:
    question = "Why do tides happen?"
    result = client.submit("patterns_loop", {"question": question}).get(timeout=90)
    assert result.state == "succeeded", result.error
    first = _refined(f"answer of <{question}>")
    second = _refined(first)
    assert result.answer["draft"] == second
    assert result.answer["refine_converged"] is True
    assert result.answer["refine_iterations"] == 2
    history = result.fields["refine_history"]
    assert [h["score"] for h in history] == [len(first) / 100, len(second) / 100]
    assert history[0]["fields"] == {"draft_next": first, "quality": len(first) / 100}
    assert result.outputs["refine"]["reason"] == "threshold"
    assert _decisions(result, "loop") == [("refine", "continue"), ("refine", "stop")]
    assert result.trail[-1].detail == {**history[1], "reason": "threshold"}
    assert [t.node for t in result.timings][1:] == [
        "refine[1]/refine", "refine[1]/score_draft", "refine[2]/refine", "refine[2]/score_draft"]


def test_loop_stops_when_the_score_plateaus(client: Client) -> None:
    result = client.submit("t_loop_plateau", {"question": "Why?"}).get(timeout=120)
    assert result.state == "succeeded", result.error
    scores = [h["score"] for h in result.fields["refine_history"]]
    assert scores == [0.32, 0.48, 0.64, 0.76, 0.76, 0.76]
    assert result.answer["refine_converged"] is True
    assert result.outputs["refine"]["reason"] == "plateau"


def test_loop_gives_up_at_max_iterations_and_the_chain_goes_on(client: Client) -> None:
    result = client.submit("t_loop_max", {"question": "Why?"}).get(timeout=90)
    assert result.state == "succeeded", result.error
    assert result.answer["refine_converged"] is False
    assert result.answer["refine_iterations"] == 3
    assert result.outputs["refine"]["reason"] == "max_iterations"
    assert result.timings[-1].stage == "key_terms"


def test_loop_score_that_is_not_a_number_fails_clearly(client: Client) -> None:
    result = client.submit("t_loop_bad_score", {"question": "Why?"}).get(timeout=60)
    assert result.state == "failed"
    assert result.error is not None
    assert result.error.kind == "routing"
    assert "score field 'draft' must be a number" in result.error.message
    assert "key_terms" not in [t.stage for t in result.timings]


def test_loop_whose_body_contains_a_branch(client: Client) -> None:
    question = "Write an essay about rivers."
    result = client.submit("t_loop_branch", {"question": question}).get(timeout=120)
    assert result.state == "succeeded", result.error
    assert result.answer["polish_iterations"] == 3
    assert _decisions(result, "branch") == [(f"polish[{i}]/how", "essay") for i in (1, 2, 3)]
    draft = f"answer of <{question}>"
    for _ in range(3):
        draft = _refined(draft)
    assert result.answer["draft"] == draft
    assert [h["fields"]["task_type"] for h in result.fields["polish_history"]] == ["essay"] * 3


# --- sub-pipelines --------------------------------------------------------------------------------

def test_subpipelines_by_name_and_inline_nest(client: Client) -> None:
    question = "Write an essay on glaciers."
    result = client.submit("t_nested_inline", {"question": question}).get(timeout=90)
    assert result.state == "succeeded", result.error
    assert result.answer["answer"] == f"answer of <{question}>"
    assert len(result.answer["definitions"]) == len(result.answer["key_terms"]) == 2
    nodes = [t.node for t in result.timings]
    assert nodes[0] == "outer/study/key_terms"
    assert nodes[1:3] == ["outer/study/terms[0]/define", "outer/study/terms[1]/define"]
    assert nodes[3:] == ["outer/respond/patterns_branch/route/classify_task",
                         "outer/respond/patterns_branch/route/essay/essay"]


# --- combinations: replace inside chord members ---------------------------------------------------

def test_map_inside_a_branch(client: Client) -> None:
    inputs = {"mode": "Glossary", "question": "Why?", "terms": ["salt", "wind"]}
    result = client.submit("t_branch_map", inputs).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.answer["definitions"] == ["definition of <salt>", "definition of <wind>"]
    assert [t.node for t in result.timings] == ["pick/glossary/defs[0]/define", "pick/glossary/defs[1]/define"]


def test_subpipeline_inside_a_map(client: Client) -> None:
    result = client.submit("t_map_subpipeline", {"terms": ["salt", "wind", "rock"]}).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.answer["answers"] == [f"answer of <definition of <{t}>>" for t in ("salt", "wind", "rock")]
    assert result.fields["definitions"] == [f"definition of <{t}>" for t in ("salt", "wind", "rock")]
    assert "each[2]/explain/short_answer" in result.outputs


def test_map_items_that_branch_keep_input_order(client: Client) -> None:
    questions = ["Write an essay on ice.", "Give a short answer: why salt?", "Write an essay on fire.",
                 "Short answer: what is wind?", "Pick the multiple choice option for rock."]
    result = client.submit("t_map_branch_items", {"questions": questions}).get(timeout=90)
    assert result.state == "succeeded", result.error
    assert result.answer["types"] == ["essay", "short_answer", "essay", "short_answer", "multiple_choice"]
    assert result.answer["answers"] == [f"answer of <{q}>" for q in questions]
    assert sorted(d[0] for d in _decisions(result, "branch")) == [f"qs[{i}]/route" for i in range(5)]


def test_map_items_that_loop_a_different_number_of_times(client: Client) -> None:
    drafts = ["a", "x" * 30, "y" * 40]
    result = client.submit("t_map_loop_items", {"drafts": drafts}).get(timeout=120)
    assert result.state == "succeeded", result.error
    assert result.answer["rounds"] == [4, 2, 1]
    expected = []
    for draft, rounds in zip(drafts, [4, 2, 1], strict=True):
        for _ in range(rounds):
            draft = _refined(draft)
        expected.append(draft)
    assert result.answer["polished"] == expected
    assert all(q >= 0.5 for q in result.fields["qualities"])


def test_map_of_maps(client: Client) -> None:
    groups = [["salt", "wind"], [], ["rock", "ice", "sand"]]
    result = client.submit("t_map_of_maps", {"groups": groups}).get(timeout=90)
    assert result.state == "succeeded", result.error
    assert result.answer["definition_groups"] == [[f"definition of <{t}>" for t in g] for g in groups]
    assert "outer[2]/inner[1]/define" in result.outputs


# --- adaptive -------------------------------------------------------------------------------------

def test_adaptive_picks_a_structure_per_input_type(client: Client) -> None:
    cases = {
        "What is the capital of France?": ("question", "quick", ["adapt/quick/short_answer"]),
        "The Rhine flows into the North Sea.": ("statement", "summary", ["adapt/summary/summarize"]),
    }
    handles = {text: client.submit("patterns_adaptive", {"question": text}) for text in cases}
    for text, (kind, structure, nodes) in cases.items():
        result = handles[text].get(timeout=60)
        assert result.state == "succeeded", result.error
        assert result.outputs["adapt"]["type"] == kind
        assert result.outputs["adapt"]["structure"] == structure
        assert result.trail[0].choice == structure
        assert result.trail[0].detail["length"] == len(text)
        assert [t.node for t in result.timings] == nodes
    assert handles["The Rhine flows into the North Sea."].get(timeout=5).answer["answer"].startswith("summary of")


def test_adaptive_complex_reasoning_runs_a_hierarchy(client: Client) -> None:
    text = ("Why did the Roman Empire fall, and how did economic causes compare with military pressure "
            "and political instability in explaining its decline?")
    result = client.submit("patterns_adaptive", {"question": text}).get(timeout=90)
    assert result.state == "succeeded", result.error
    analysis = result.outputs["adapt"]
    assert analysis["type"] == "complex_reasoning"
    assert analysis["complexity"] >= 0.5
    assert analysis["structure"] == "deliberate"
    nodes = [t.node for t in result.timings]
    assert nodes[0] == "adapt/deliberate/patterns_map/key_terms"
    assert nodes[-1] == "adapt/deliberate/essay"


def test_adaptive_without_a_structure_for_the_type_fails_clearly(client: Client) -> None:
    result = client.submit("t_adaptive_strict", {"text": "The sea is salty."}).get(timeout=30)
    assert result.state == "failed"
    assert result.error is not None
    assert result.error.kind == "routing"
    assert "no structure for input type 'statement'" in result.error.message


# --- hierarchical structure file ------------------------------------------------------------------

def test_hierarchical_structure_runs_modules_pipelines_and_conditionals(client: Client) -> None:
    question = "Write an essay on how glaciers shape valleys."
    result = client.submit("patterns_hierarchical", {"question": question}).get(timeout=90)
    assert result.state == "succeeded", result.error
    assert result.answer["task_type"] == "essay"
    assert result.answer["answer"] == f"answer of <{question}>"
    assert result.answer["definitions"] == [_lm("definition", t) for t in result.answer["key_terms"]]
    assert [t.node for t in result.timings] == [
        "study/terms", "study/glossary[0]/define", "study/glossary[1]/define",
        "respond/by_type/classify", "respond/by_type/essay/long"]
    assert _decisions(result, "branch") == [("respond/by_type", "essay")]


def test_pattern_started_with_plain_json_by_name(client: Client) -> None:
    """`pipeline.run` by name, as a service in another language would send it."""
    sent = client.app.send_task("pipeline.run", args=[{"pipeline": "patterns_branch",
                                                       "inputs": {"question": "Short answer: why salt?"}}],
                                queue="pipeline.routing")
    raw = sent.get(timeout=60)
    assert raw["state"] == "succeeded"
    assert raw["answer"] == {"task_type": "short_answer", "answer": "answer of <Short answer: why salt?>"}
    assert raw["trail"][0]["choice"] == "short_answer"
