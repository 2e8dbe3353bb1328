"""The answers benchmark's paired test: a variant beats the default only when the same items say so beyond
chance (bench/answers.py: discordant, exact_p, measurably_better)."""

from bench.answers import Item, Outcome, discordant, exact_p, measurably_better


def outcomes(variant: str, passed: list[bool]) -> list[Outcome]:
    return [Outcome(variant, Item(f"q{n}", "m", {}, {}, factual=True), 1.0, 1, passed=ok) for n, ok in
            enumerate(passed)]


def test_discordant_items_count_only_where_the_two_differ() -> None:
    runs = outcomes("a", [True, True, False, False, True]) + outcomes("b", [True, False, True, False, False])
    assert discordant(runs, "a", "b") == (2, 1)
    assert discordant(runs, "b", "a") == (1, 2)


def test_items_only_one_variant_ran_are_left_out() -> None:
    runs = outcomes("a", [True, True, True]) + outcomes("b", [False])
    assert discordant(runs, "a", "b") == (1, 0)


def test_the_exact_test_matches_the_binomial_tails() -> None:
    assert exact_p(0, 0) == 1.0
    assert exact_p(3, 2) == 1.0  # 3 against 2: anything could give that
    assert exact_p(8, 0) == 2 / 2 ** 8
    assert abs(exact_p(10, 2) - 2 * (1 + 12 + 66) / 2 ** 12) < 1e-12


def test_one_question_more_is_no_win_but_a_clear_split_is() -> None:
    tie = outcomes("few", [True] * 41 + [False] * 11) + outcomes("default", [True] * 38 + [False, True, True]
                                                                  + [False] * 11)
    assert not measurably_better(tie, "few", "default")
    clear = outcomes("few", [True] * 20) + outcomes("default", [True] * 8 + [False] * 12)
    assert measurably_better(clear, "few", "default")
    assert not measurably_better(clear, "default", "few")
