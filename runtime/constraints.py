"""Lexically constrained decoding: the constraint state of a hypothesis and the candidate step of
dynamic beam allocation, with the semantics of fairseq's ``LexicallyConstrainedBeamSearch``
(Post & Vilar 2018; Hu et al. 2019) and ``token_generation_constraints`` (fairseq 0.12), so that
ids and scores equal fairseq's. numpy only.

A sentence's constraints are token sequences (each a target phrase without ``</s>``) that every
finished hypothesis should contain. Each hypothesis carries a state saying how far it got:

- ``ordered``: the constraints in the given order, anything between them. The state is the
  position reached in their concatenation; a token that does not continue the current constraint
  mid-way starts over (at its first token if it is the first constraint's first token).
- ``unordered``: in any order. The state walks a trie of the constraints and counts, per trie
  node, how often it is on the current path (``generated``) and how often a constraint ending
  there was completed (``completed``); a token that leaves the trie goes back to the root,
  completing the longest finished constraint on the abandoned path.

A state's ``bank`` is the number of constraint tokens it holds; ``finished`` says every
constraint is met. At each step the candidates of a sentence are its best 2 x beam expansions,
the best expansion of each hypothesis and every expansion by a token its state can take next;
they are sorted by bank (most constraint tokens first) and score, and the beam is dealt out
round-robin across the banks, so hypotheses that made progress on the constraints keep a place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeGuard

import numpy as np

NEG_INF = np.float32(-np.inf)
BANK_WEIGHT = -100.0  # fairseq's sort key: (constraint tokens - bank) * BANK_WEIGHT + score


# --- ordered --------------------------------------------------------------------------------------


class _Sequence:
    """The constraints of a sentence, concatenated: ``tokens`` and, per position, whether a
    constraint ends there."""

    def __init__(self, constraints: Sequence[Sequence[int]]):
        self.tokens: list[int] = [int(t) for c in constraints for t in c]
        self.ends: list[bool] = [i == len(c) - 1 for c in constraints for i in range(len(c))]
        self.distinct = len(set(self.tokens))


class OrderedState:
    """Progress through the concatenated constraints: ``position`` is the index of the last
    constraint token matched (-1: none)."""

    __slots__ = ("seq", "position")

    def __init__(self, seq: _Sequence, position: int = -1):
        self.seq, self.position = seq, position

    @classmethod
    def start(cls, constraints: Sequence[Sequence[int]]) -> OrderedState:
        return cls(_Sequence(constraints))

    @property
    def bank(self) -> int:
        return self.position + 1

    @property
    def finished(self) -> bool:
        return self.position + 1 == len(self.seq.tokens)

    @property
    def distinct_tokens(self) -> int:
        return self.seq.distinct

    def next_tokens(self) -> set[int]:
        """The tokens that make progress: the next constraint token and, once past the first
        token, the first one again (a restart)."""
        out = set()
        if self.position > 0:
            out.add(self.seq.tokens[0])
        if not self.finished:
            out.add(self.seq.tokens[self.position + 1])
        return out

    def advance(self, token: int) -> OrderedState:
        seq, pos = self.seq, self.position
        if self.finished:
            return self
        if seq.tokens[pos + 1] == token:
            return OrderedState(seq, pos + 1)
        if seq.ends[pos]:  # between constraints (or before the first: ends[-1] is the last end)
            return self
        return OrderedState(seq, 0 if token == seq.tokens[0] else -1)


# --- unordered ------------------------------------------------------------------------------------


class _Node:
    """A trie node: ``ends`` constraints end here, ``below`` constraints end here or further down."""

    __slots__ = ("token", "parent", "children", "ends", "below")

    def __init__(self, token: int | None, parent: _Node | None):
        self.token, self.parent = token, parent
        self.children: dict[int, _Node] = {}
        self.ends = 0
        self.below = 0


class _Trie:
    def __init__(self, constraints: Sequence[Sequence[int]]):
        self.root = _Node(None, None)
        for c in constraints:
            node = self.root
            for t in c:
                node = node.children.setdefault(int(t), _Node(int(t), node))
            node.ends += 1
            up: _Node | None = node
            while up is not None:
                up.below += 1
                up = up.parent
        self.distinct = len({t for c in constraints for t in c})


class UnorderedState:
    """A position in the constraint trie with the counts of the nodes on the current paths
    (``generated``) and of the constraints completed (``completed``), per node."""

    __slots__ = ("trie", "node", "generated", "completed")

    def __init__(self, trie: _Trie, node: _Node, generated: dict, completed: dict):
        self.trie, self.node, self.generated, self.completed = trie, node, generated, completed

    @classmethod
    def start(cls, constraints: Sequence[Sequence[int]]) -> UnorderedState:
        trie = _Trie(constraints)
        return cls(trie, trie.root, {}, {})

    def _moved_to(self, node: _Node) -> UnorderedState:
        """A copy of this state's counts, at ``node`` (counted as generated unless the root)."""
        generated = dict(self.generated)
        if node is not self.trie.root:
            generated[node] = generated.get(node, 0) + 1
        return UnorderedState(self.trie, node, generated, dict(self.completed))

    @property
    def bank(self) -> int:
        return sum(self.generated.values())

    @property
    def completed_count(self) -> int:
        node = self.node
        pending = 1 if node.ends and self.completed.get(node, 0) < node.ends else 0
        return sum(self.completed.values()) + pending

    @property
    def finished(self) -> bool:
        return self.trie.root.below == self.completed_count

    @property
    def distinct_tokens(self) -> int:
        return self.trie.distinct

    def next_tokens(self) -> set[int]:
        out = set(self.trie.root.children)
        if self.node is not self.trie.root:
            out |= set(self.node.children)
        return out

    def _open(self, node: _Node | None) -> TypeGuard[_Node]:
        return node is not None and self.generated.get(node, 0) < node.below

    def advance(self, token: int) -> UnorderedState:
        root = self.trie.root
        child = self.node.children.get(token)
        if self._open(child):
            return self._moved_to(child)
        # off the trie: back to the root (or to the root's child for this token, if still open)
        restart = root.children.get(token)
        nxt = self._moved_to(restart if self._open(restart) else root)
        # the abandoned path: complete the deepest constraint finished on it, else forget its nodes
        node = self.node
        while node is not root:
            if node.ends and self.completed.get(node, 0) < node.ends:
                nxt.completed[node] = nxt.completed.get(node, 0) + 1
                break
            nxt.generated[node] = nxt.generated.get(node, 0) - 1
            assert node.parent is not None  # only the root has no parent, and the loop stops there
            node = node.parent
        return nxt


def start_state(constraints: Sequence[Sequence[int]], order: str):
    """The state of a hypothesis that has generated nothing yet."""
    return (OrderedState if order == "ordered" else UnorderedState).start(constraints)


# --- the candidate step ---------------------------------------------------------------------------


@dataclass
class ConstrainedCandidates:
    """The candidates of one sentence at one step, in order: ``scores`` (cumulative), ``tokens``,
    ``beams`` (which hypothesis each extends), ``states`` (the constraint state after it); the
    first ``width`` are the search's candidates."""

    scores: np.ndarray
    tokens: np.ndarray
    beams: np.ndarray
    states: list


def constrained_candidates(
    step: int,
    width: int,
    top: tuple[np.ndarray, np.ndarray, np.ndarray],
    row_best: tuple[np.ndarray, np.ndarray] | None,
    next_scores: list[dict[int, np.float32]],
    states: list,
) -> ConstrainedCandidates:
    """One step of dynamic beam allocation for one sentence.

    ``top``: its best ``width`` (= 2 x beam) expansions over all hypotheses, (cumulative scores,
    tokens, beams), best first; ``row_best``: per hypothesis its best expansion (cumulative score,
    token), None at step 0 (every hypothesis is the same: only the first is expanded);
    ``next_scores``: per hypothesis, the cumulative score of each token its state can take next
    (only the first at step 0); ``states``: each hypothesis' constraint state. Scores must have
    the search rules applied (and </s> banned where the constraints are not finished)."""
    scores, tokens, beams = (list(a) for a in top)
    if row_best is not None:
        scores += list(row_best[0])
        tokens += list(row_best[1])
        beams += list(range(len(states)))
    for beam, by_token in enumerate(next_scores):
        for token in sorted(by_token):  # (fairseq: a set's order; ties between them do not matter)
            scores.append(by_token[token])
            tokens.append(token)
            beams.append(beam)
        if step == 0:
            break
    scores_a = np.asarray(scores, dtype=np.float32)
    tokens_a = np.asarray(tokens, dtype=np.int64)
    beams_a = np.asarray(beams, dtype=np.int64)
    new_states = [states[b].advance(int(t)) for b, t in zip(beams_a, tokens_a)]
    banks = np.array([s.bank for s in new_states], dtype=np.int64)
    distinct = states[0].distinct_tokens

    # sort by bank (most constraint tokens first), then score
    key = (distinct - banks) * np.float32(BANK_WEIGHT) + scores_a
    order = np.argsort(-key, kind="stable")
    scores_a, tokens_a, beams_a, banks = scores_a[order], tokens_a[order], beams_a[order], banks[order]
    new_states = [new_states[i] for i in order]

    # drop repeats of a (hypothesis, token) pair: after the sort they are neighbours. (As in fairseq,
    # the first candidate is compared with the last one, and the states follow the others from the
    # second candidate on.)
    pair = beams_a * (1 << 32) + tokens_a
    unique = np.roll(pair, 1) != pair
    scores_a, tokens_a, beams_a, banks = scores_a[unique], tokens_a[unique], beams_a[unique], banks[unique]
    new_states = new_states[:1] + [s for s, keep in zip(new_states[1:], unique[1:]) if keep]

    # deal the beam out round-robin across the banks: the n-th best of each bank in turn
    stride = len(banks) + 1
    stripes = np.empty(len(banks), dtype=np.int64)
    rank, current = -1, banks[0] if len(banks) else 0
    for i, bank in enumerate(banks):
        rank = 0 if bank != current else rank + 1
        current = bank
        stripes[i] = distinct - bank + rank * stride
    order = np.argsort(stripes, kind="stable")
    return ConstrainedCandidates(
        scores_a[order][:width], tokens_a[order][:width], beams_a[order][:width], [new_states[i] for i in order]
    )
