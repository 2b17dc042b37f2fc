"""StopChecker: stop strings found across deltas, nothing emitted that may still be a stop."""

from __future__ import annotations

import itertools

import pytest

from falconet.engine.stop import StopChecker
from falconet.errors import FalconetError


def _stream(stop: list[str], deltas: list[str], include: bool = False) -> tuple[list[str], bool, str]:
    """Feed the deltas until a stop; return what was emitted per call, whether it stopped, and
    the whole output including the final flush."""
    checker = StopChecker(stop, include)
    emitted, stopped = [], False
    for d in deltas:
        text, stopped = checker.check(d)
        emitted.append(text)
        if stopped:
            break
    tail = "" if stopped else checker.flush()
    return emitted, stopped, "".join(emitted) + tail


def test_stop_in_one_delta():
    assert _stream(["###"], ["Hello ### world"]) == (["Hello "], True, "Hello ")
    assert _stream(["###"], ["Hello ### world"], include=True)[2] == "Hello ###"


def test_stop_split_across_deltas_is_held_back_then_cut():
    emitted, stopped, text = _stream(["STOP"], ["abc S", "T", "O", "P tail"])
    assert emitted == ["abc ", "", "", ""] and stopped and text == "abc "
    assert _stream(["STOP"], ["abc S", "T", "O", "P tail"], include=True)[2] == "abc STOP"


def test_false_start_is_released_as_soon_as_it_cannot_match():
    emitted, stopped, text = _stream(["STOP"], ["a ST", "x", "yz"])
    assert emitted == ["a ", "STx", "yz"] and not stopped and text == "a STxyz"


def test_overlapping_prefix_holds_only_what_may_still_match():
    # "abab" ends in "ab", which may start "abac": hold back exactly "ab", not "abab".
    checker = StopChecker(["abac"])
    assert checker.check("abab") == ("ab", False)
    assert checker.check("ac!") == ("", True)
    # with a self-overlapping stop string the match starts in the held-back text
    assert _stream(["aab"], ["a", "a", "a", "b"]) == (["", "", "a", ""], True, "a")


def test_earliest_stop_string_wins():
    assert _stream(["END", "\n\n"], ["one\n\ntwo END"])[2] == "one"
    assert _stream(["\n\n", "END"], ["one END\n\n"])[2] == "one "
    # the one completed first wins, so the split into deltas never matters: "b" ends before "abc"
    assert _stream(["abc", "b"], ["xabc"])[2] == "xa"
    assert _stream(["abc", "b"], ["x", "a", "b", "c"])[2] == "xa"
    checker = StopChecker(["abc", "b"], include_stop_str_in_output=True)
    assert checker.check("xabc") == ("xab", True) and checker.matched == "b"


def test_flush_releases_held_text_when_no_stop_came():
    checker = StopChecker(["</s>"])
    assert checker.check("done </") == ("done ", False)
    assert checker.flush() == "</"
    assert checker.flush() == ""


def test_after_a_stop_everything_is_ignored():
    checker = StopChecker(["."])
    assert checker.check("Hi. there") == ("Hi", True)
    assert checker.check("more") == ("", True)
    assert checker.flush() == ""
    assert checker.matched == "."


def test_no_stop_strings_passes_text_through():
    assert _stream([], ["a", "b"]) == (["a", "b"], False, "ab")


@pytest.mark.parametrize("include", [False, True])
def test_every_split_of_the_text_gives_the_same_output(include):
    """Against a one-shot reference: cut at the first completed stop string."""
    text, stops = "xx<e<en<end>>yy<end>", ["<end>", "n<", "zz"]
    reference = "xx<e<e" + ("n<" if include else "")
    for cuts in itertools.combinations(range(1, len(text)), 3):
        bounds = (0, *cuts, len(text))
        deltas = [text[a:b] for a, b in itertools.pairwise(bounds)]
        assert _stream(stops, deltas, include)[2] == reference, deltas


def test_empty_stop_string_rejected():
    with pytest.raises(FalconetError):
        StopChecker(["ok", ""])
