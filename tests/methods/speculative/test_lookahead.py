"""The Lookahead pool: continuations per context with counts, retrieved as a tree by frequency."""

from falconet.methods.speculative.base import Draft
from falconet.methods.speculative.lookahead import TokenTrie


def _paths(tokens, parents):
    draft = Draft(tokens, parents=parents) if parents else Draft(tokens)
    leaves = set(range(len(tokens))) - set(parents or range(-1, len(tokens) - 1))
    return sorted(tuple(tokens[i] for i in draft.path(leaf)) for leaf in leaves)


def test_continuations_are_counted_and_ranked():
    trie = TokenTrie(min_n=2, max_n=2, depth=3)
    text = [1, 2, 3, 4, 5, 1, 2, 3, 4, 6, 1, 2, 7, 8, 9]
    trie.add(text, 0)  # only the continuations whose 3 tokens are all known
    tokens, parents = trie.branches((1, 2), budget=10)
    assert _paths(tokens, parents) == [(3, 4, 5), (3, 4, 6), (7, 8, 9)]
    assert tokens[:3] == [3, 4, 6]  # the twice-seen branch first, its most recent ending first
    assert trie.branches((1, 2), budget=4) == ([3, 4, 6, 5], [-1, 0, 1, 1])
    assert trie.branches((9, 9), budget=4) == ([], [])


def test_adding_in_pieces_equals_adding_at_once():
    text = [5, 6, 7, 5, 6, 8, 5, 6, 7, 9, 9, 5, 6, 7]
    whole, pieces = TokenTrie(depth=4), TokenTrie(depth=4)
    whole.add(text, 0, len(text))
    done = 0
    for end in (4, 9, len(text)):
        pieces.add(text[:end], done)
        done = max(done, end - 4 + 1)
    pieces.add(text, done, len(text))  # the sequence ended: its last continuations too
    for key in [(5, 6), (6, 7), (5, 6, 7), (9, 9)]:
        assert whole.branches(key, 20) == pieces.branches(key, 20), key


def test_the_pool_is_bounded():
    trie = TokenTrie(min_n=2, max_n=2, depth=2, max_contexts=5)
    trie.add(list(range(100)), 0)
    assert len(trie) == 5
    assert trie.branches((96, 97), 3) == ([98, 99], [-1, 0])  # the newest contexts stay
