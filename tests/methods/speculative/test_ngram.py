from falconet.methods.speculative.ngram import lookup


def test_continues_the_latest_match_of_the_longest_ngram():
    ids = [1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 6, 7, 2, 3]
    # "2 3" last occurred at 6-7 followed by 4 5 6; the 3-gram "7 2 3" has no earlier match
    assert lookup(ids, 3, max_n=3, min_n=2) == [4, 5, 6]
    assert lookup(ids, 10, max_n=3, min_n=2) == [4, 5, 6, 7, 2, 3]  # up to the end of the text


def test_longer_ngrams_win_and_short_texts_give_nothing():
    ids = [5, 1, 2, 8, 0, 1, 2, 9, 5, 0, 1, 2]
    assert lookup(ids, 2, max_n=3, min_n=2) == [9, 5]  # "0 1 2" beats the later-first "1 2" at 1
    assert lookup([4], 3, max_n=3, min_n=1) == []
    assert lookup([1, 2, 3, 4], 3, max_n=3, min_n=1) == []  # no repeat at all
    assert lookup([7, 7], 3, max_n=3, min_n=1) == [7]


def test_tree_merges_the_continuations_of_all_matches():
    from falconet.methods.speculative.ngram import lookup_tree

    ids = [1, 2, 3, 4, 0, 1, 2, 5, 6, 0, 1, 2, 3, 7, 1, 2]
    tokens, parents = lookup_tree(ids, budget=20, depth=2, max_n=3, min_n=2, max_matches=4)
    # "1 2" occurs at 10, 5 and 0: continuations "3 7", "5 6", "3 4", most recent first; shared
    # prefixes once ("3" is a single node with children 7 and 4); the first is the first chain
    assert tokens == [3, 7, 5, 6, 4]
    assert parents == [-1, 0, -1, 2, 0]
    # the budget cuts the tree in node order (parents always before children)
    assert lookup_tree(ids, budget=3, depth=2, max_n=3, min_n=2, max_matches=4) == ([3, 7, 5], [-1, 0, -1])
    assert lookup_tree(ids, budget=20, depth=2, max_n=3, min_n=2, max_matches=1) == ([3, 7], [-1, 0])
    assert lookup_tree([1, 2, 3], budget=5, depth=3, max_n=3, min_n=1, max_matches=4) == ([], [])


def test_the_index_grown_step_by_step_finds_what_a_fresh_search_finds():
    import random

    from falconet.methods.speculative.ngram import NgramIndex, lookup_tree

    rng = random.Random(0)
    ids = [rng.randrange(6) for _ in range(5)]
    grown = NgramIndex(1, 3)
    while len(ids) < 300:
        ids.extend(rng.randrange(6) for _ in range(rng.randint(1, 4)))  # a step adds 1-4 tokens
        for n in (1, 2, 3):  # brute force: followers of earlier occurrences of the last n tokens
            expect = [f for f in range(len(ids) - 1, n - 1, -1) if ids[f - n : f] == ids[-n:]][:3]
            fresh = NgramIndex(1, 3)
            fresh.update(ids)
            assert fresh.continuations(n, 3) == expect
        assert lookup(ids, 4, 3, 1, grown) == lookup(ids, 4, 3, 1)
        assert lookup_tree(ids, 10, 4, 3, 1, 3, grown) == lookup_tree(ids, 10, 4, 3, 1, 3)
