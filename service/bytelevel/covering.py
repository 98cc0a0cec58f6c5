"""Per-model byte-level language model over a token LM: the covering tree.

Semantics (what the numbers mean)
---------------------------------
Fix a root path R (the *special context*: chat template, BOS, prompt tokens; it produces no
bytes here).  The text x = x_1..x_n is the bytes generated after R.

* A **node** is a token path P = R + (t_1..t_k) whose bytes decode(P) are a prefix x[:j] of
  the text; j is the node's *start* (where its next token begins).
* A node is **valid** (mode "canonical", the default) when every prefix of it that ends where
  x is complete, well-formed UTF-8 is the tokenizer's canonical encoding of those bytes:
  R + t_1..t_i == R + encode(x[:|decode(t_1..t_i)|]).  Prefixes that end inside a character
  are not checked (they are *provisional*); the check happens when the character completes.
  Mode "all" accepts every tokenization (over primary ids: `<0x41>` beside `A` is not an
  inner node).
* A **cover** of x is a valid node P at start j < n followed by any token t whose bytes start
  with x[j:] (the last token is *free*: it may overhang x and is not checked, as in
  ByteSampler's default and Phan et al.'s fast mode).  The **prefix mass** is
  V(x) = sum over covers of P(P | R) * P(t | P), and V(empty) = 1.
* The **next-byte distribution** is p(c | x) = V(x c) / Z(x) for c < 256 and
  p(stop | x) = S(x) / Z(x), where S(x) is the mass of stop tokens after the valid nodes
  with decode(P) == x, counted only where x is complete UTF-8, and Z normalizes the 257
  outcomes.  Sampling byte by byte from p is what the ensemble does.

Byte-Token Representation Lemma (Phan et al.): if the model puts no mass on invalid paths
(no free token whose completion is non-canonical, no stop inside a character) then
Z(x) == V(x) at every step and prod_i p(x_i | x_<i) == V(x) exactly: the byte model is the
token model's own distribution over text, restricted to canonical tokenizations.  Real models
leak a little mass onto non-canonical continuations; the per-step renormalization spreads it
over the valid outcomes and `CoverStats.leaked_nats` reports it (sum of log V/Z).

Why canonical nodes: the only path that ends exactly at byte n and is valid is encode(x[:n]),
so each byte creates **at most one new path** at a character boundary (a few inside a
multi-byte character, where the tokenizations of the partial character are provisional).
Covers that overhang the text need no forward at all: their mass is a reduction of their
node's cached distribution.  Mode "all" is the exact sampling distribution of the token
model but creates a new path per tokenization; it exists for evaluation.

How far back covers reach: no pre-token rule is applied.  A node at start j stays alive while
some vocabulary token starts with x[j:] (so at most `max_token_bytes` back, in practice the
length of the current word), and canonicality of nodes is checked with the real tokenizer.
A cutoff at "the last pre-token boundary" would be wrong for GPT-2-style regexes: "we'l" splits
as we|'|l but "we'll" as we|'ll (the boundary moves back over the apostrophe), and "a  " vs
"a  b" re-splits a whitespace run (`\\s+(?!\\S)`).  Gemma's pre-tokenizer splits on " " after
its normalizer has replaced every " " with "▁", so it never splits: BPE runs on whole
segments between added tokens, and only the vocabulary bounds the reach.

Cost per byte (per model): one `reduce` call carrying one query per live node (a few), of which
at most one is a new path (one forward) at character boundaries.  `extend` scores a known
byte string (a prompt) with a single `reduce` call, since the node structure follows from the
bytes and the tokenizer alone.  Memory is bounded by the live nodes; `prune` (relative
threshold, 0 = exact) drops nodes whose cover mass is negligible and reports the mass.

Canonical encodings are computed on a window of the last `encode_window`+ bytes starting at a
token boundary, verified against a second, longer window; any disagreement falls back to
encoding the whole segment (`CanonicalEncoder`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from service.bytelevel.byte_tables import TokenByteTable
from service.bytelevel.reduction import (
    Path,
    Reduction,
    ReductionOracle,
    ReductionQuery,
)
from service.bytelevel.utf8 import Utf8State, is_complete

CoverMode = Literal["canonical", "all"]
# Continuations that exercise every class a GPT-2/Llama-3 style split regex distinguishes
# after the current text: letter, digit, punctuation, space, newline.
DEFAULT_PROBES: tuple[str, ...] = ("a", "1", ".", " ", "\n")
NEG_INF = -math.inf
STOP = 256
# Canonical tokens replayed before the earliest cover when pruning has to be undone.
REBUILD_MARGIN_TOKENS = 2


class ZeroProbabilityError(ValueError):
    """The byte has probability zero under this tree (no cover continues with it)."""


@dataclass(frozen=True, slots=True)
class CoverNode:
    path: Path  # full path, root included
    start: int  # offset in the segment text where the node's next token starts
    logmass: float  # log P(path after root | root)


@dataclass(slots=True)
class CoverStats:
    steps: int = 0  # next-byte distributions computed
    oracle_calls: int = 0
    queries: int = 0  # reduction queries sent
    new_paths: int = 0  # nodes created (each needs one forward when first queried)
    live_nodes: int = 0  # summed over steps (divide by steps for the mean)
    max_nodes: int = 0
    pruned_mass: float = 0.0  # sum over steps of pruned mass / prefix mass
    # log of the total pruned mass relative to the root: bounds V_exact(x) - V_pruned(x)
    pruned_logmass: float = NEG_INF
    recoveries: int = 0  # rebuilds after pruning had removed every cover of a byte
    leaked_nats: float = 0.0  # sum over steps of log(V / Z)
    canonical_full_encodes: int = 0
    canonical_window_encodes: int = 0


class CanonicalEncoder:
    """Canonical token ids of a growing text, re-encoding only a window at its end.

    The window starts at a token boundary of an earlier encoding that lies `window` bytes or
    more before the end, at a character boundary (preferably before a space or newline,
    where pre-tokens start).  The answer is accepted only if a second window that starts
    another `window` bytes earlier reproduces the same tokens after the first window's start;
    otherwise the whole text is encoded.  BPE boundaries can in principle move arbitrarily far
    back; the check makes a silent error need two independent windows to agree on it.
    """

    def __init__(self, table: TokenByteTable, window: int = 64) -> None:
        self.table = table
        self.window = window
        self._toks: list[int] = []
        self._ends: list[int] = []  # _ends[i]: byte offset where token i ends
        self._text = b""
        self.full_encodes = 0
        self.window_encodes = 0

    def reset(self) -> None:
        self._toks, self._ends, self._text = [], [], b""

    def tokens(self, text: bytes) -> list[int]:
        """Canonical ids of `text` (complete UTF-8).  Texts of successive calls must extend
        each other or be prefixes of one another (one growing segment)."""
        windowed = self._windowed(text)
        base: list[int] = []
        ends: list[int] = []
        if windowed is None:
            self.full_encodes += 1
            result = self.table.encode(text)
        else:
            self.window_encodes += 1
            base, ends, result = windowed
            ends = list(ends)
        pos = ends[-1] if ends else 0
        for tid in result[len(base) :]:
            pos += len(self.table.token_bytes(tid))
            ends.append(pos)
        self._toks, self._ends, self._text = result, ends, text
        return result

    def _cut(self, text: bytes, limit: int) -> int | None:
        """Index k such that tokens [:k] of the stored encoding end at or before `limit`, at a
        character boundary of `text`; prefers boundaries followed by whitespace."""
        k = _bisect_right(self._ends, limit)
        fallback = None
        for i in range(k, max(k - 8, 0), -1):
            s = self._ends[i - 1]
            if s >= len(text) or text[s] & 0xC0 == 0x80:
                continue
            if text[s] in b" \n\t\r":
                return i
            if fallback is None:
                fallback = i
        return fallback

    def _windowed(self, text: bytes) -> tuple[list[int], list[int], list[int]] | None:
        n = len(text)
        shared = _common_prefix(self._text, text)
        if n < 3 * self.window or shared < 2 * self.window:
            return None
        k = self._cut(text, min(shared, n - self.window))
        if k is None:
            return None
        s = self._ends[k - 1]
        k2 = self._cut(text, s - self.window)
        if k2 is None:
            return None
        s2 = self._ends[k2 - 1]
        tail = self.table.encode(text[s:])
        check = self.table.encode(text[s2:])
        if check != self._toks[k2:k] + tail:
            return None
        return self._toks[:k], self._ends[:k], self._toks[:k] + tail


_PathKey = tuple[int, int, int]


def _key(path: Path) -> _PathKey:
    """(length, last id, hash): identifies one path among a handful of candidates without
    keeping the (long) path itself."""
    return (len(path), path[-1] if path else -1, hash(path))


def _window_start(text: bytes, at: int) -> int:
    """A position at or after `at` (clamped to 0) where a pre-token starts for sure enough:
    just before a space or newline, on a character boundary.  Pre-tokenizing from there
    gives the same pieces near the end of `text` as pre-tokenizing all of it."""
    if at <= 0:
        return 0
    for i in range(at, len(text)):
        if text[i] in b" \n":
            return i
    return 0


def _bisect_right(values: list[int], x: int) -> int:
    lo, hi = 0, len(values)
    while lo < hi:
        mid = (lo + hi) // 2
        if values[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _lse(values: Sequence[float]) -> float:
    if not values:
        return NEG_INF
    m = max(values)
    if m == NEG_INF:
        return NEG_INF
    return m + math.log(sum(math.exp(v - m) for v in values))


@dataclass(slots=True)
class _Step:
    reductions: list[Reduction]
    logits: NDArray[np.float64]  # unnormalized log V(xc) / log S(x), shape (257,)
    logz: float
    logp: NDArray[np.float64]  # normalized


@dataclass(slots=True)
class _Transition:
    """What one byte does to the node set (shared by `advance` and the prefetch dry run)."""

    # Every node that still covers text + byte: (node, weight = its covers' mass, the part
    # of that weight in tokens ending exactly at the new byte, whether longer tokens exist).
    covering: list[tuple[CoverNode, float, float, bool]] = field(default_factory=list)
    children: list[CoverNode] = field(default_factory=list)  # valid, completed at the byte

    @property
    def nodes(self) -> list[CoverNode]:
        """The next node set: nodes that can still grow, then the new children."""
        return [c[0] for c in self.covering if c[3]] + self.children


class CoveringTree:
    """One model's byte-level LM state: the valid covers of the text after `context`."""

    def __init__(
        self,
        table: TokenByteTable,
        oracle: ReductionOracle,
        context: Sequence[int] = (),
        *,
        mode: CoverMode = "canonical",
        prune: float = 0.0,
        text_start: bool = False,
        encode_window: int = 64,
        probes: Sequence[str] | None = None,
    ) -> None:
        """`context`: root token ids (BOS, chat template...).  `prune`: drop covers below this
        fraction of the prefix mass (0 keeps all: exact).  `text_start`: the text begins a
        document, so a tokenizer with a dummy prefix sees an extra leading space, which is
        consumed here without being scored or emitted."""
        if mode not in ("canonical", "all"):
            raise ValueError(f"unknown cover mode {mode!r}")
        if not 0.0 <= prune < 1.0:
            raise ValueError("prune must be in [0, 1)")
        self.table = table
        self.oracle = oracle
        self.mode: CoverMode = mode
        if probes is None:
            probes = DEFAULT_PROBES if table.lookahead_pretokenizer else ()
        self.probes = tuple(probes)
        self.prune = prune
        self.stats = CoverStats()
        self._canon = CanonicalEncoder(table, encode_window)
        self._prefetched: dict[ReductionQuery, Reduction] = {}
        self._targets: dict[int, tuple[bool, frozenset[_PathKey]]] = {}
        self._horizon = 0  # segment length up to which reductions were prefetched
        self._rebuilding = False
        self._reset(tuple(int(t) for t in context))
        self._skip = 0
        if text_start and table.dummy_prefix:
            self.advance(0x20)
            self._renormalize()
            self._skip = 1

    # ------------------------------------------------------------------ state
    def _reset(self, root: Path) -> None:
        self._root = root
        self._text = bytearray()
        self._utf8 = Utf8State()
        self._nodes: list[CoverNode] = [CoverNode(root, 0, 0.0)]
        self._logv = 0.0
        self._step: _Step | None = None
        self._canon.reset()
        self._prefetched.clear()
        self._targets.clear()
        self._horizon = 0
        self._skip = 0

    def _renormalize(self) -> None:
        """Condition on the text so far (used for the consumed dummy-prefix space)."""
        shift = self._logv
        self._nodes = [CoverNode(n.path, n.start, n.logmass - shift) for n in self._nodes]
        self._logv = 0.0
        self._step = None

    @property
    def root(self) -> Path:
        return self._root

    @property
    def text(self) -> bytes:
        """Bytes consumed since the root (without a consumed dummy-prefix space)."""
        return bytes(self._text[self._skip :])

    @property
    def nodes(self) -> tuple[CoverNode, ...]:
        return tuple(self._nodes)

    @property
    def log_prefix_mass(self) -> float:
        """log V(text) (retained covers), relative to the root."""
        return self._logv

    @property
    def at_char_boundary(self) -> bool:
        return self._utf8.complete

    # ------------------------------------------------------------------ distribution
    def _queries(self) -> list[ReductionQuery]:
        text = bytes(self._text)
        return [ReductionQuery(n.path, text[n.start :]) for n in self._nodes]

    def _fetch(self, queries: list[ReductionQuery]) -> None:
        missing = [q for q in dict.fromkeys(queries) if q not in self._prefetched]
        if not missing:
            return
        self.stats.oracle_calls += 1
        self.stats.queries += len(missing)
        for q, r in zip(missing, self.oracle.reduce(missing), strict=True):
            self._prefetched[q] = r

    def _can_rebuild(self) -> bool:
        return self.stats.pruned_logmass > NEG_INF and not self._rebuilding

    def _ensure_step(self) -> _Step:
        if self._step is not None:
            return self._step
        queries = self._queries()
        self._fetch(queries)
        reds = [self._prefetched.pop(q) for q in queries]
        logits = np.full(257, NEG_INF)
        if reds:
            masses = np.array([n.logmass for n in self._nodes])
            table = np.stack([r.cont_lp for r in reds]) + masses[:, None]
            m = table.max(axis=0)
            finite = np.isfinite(m)
            logits[finite] = m[finite] + np.log(np.exp(table[:, finite] - m[finite]).sum(axis=0))
        if not self._utf8.complete:
            logits[STOP] = NEG_INF  # never stop inside a character
        logz = _lse(logits[np.isfinite(logits)].tolist())
        if logz == NEG_INF:
            if self._can_rebuild():
                self._rebuild()
                return self._ensure_step()
            raise ZeroProbabilityError("no cover has any continuation")
        step = _Step(reds, logits, logz, logits - logz)
        self.stats.steps += 1
        self.stats.live_nodes += len(self._nodes)
        self.stats.max_nodes = max(self.stats.max_nodes, len(self._nodes))
        self.stats.leaked_nats += max(self._logv - logz, 0.0)
        self._step = step
        return step

    def next_byte_logprobs(self) -> NDArray[np.float64]:
        """Normalized log-probabilities of the 256 next bytes and stop (index 256)."""
        return self._ensure_step().logp.copy()

    def unnormalized_logprobs(self) -> NDArray[np.float64]:
        """log V(x c) for each byte c and log S(x) at 256 (before normalization)."""
        return self._ensure_step().logits.copy()

    # ------------------------------------------------------------------ advancing
    def _transition(
        self,
        nodes: Sequence[CoverNode],
        text: bytes,
        byte: int,
        reds: Sequence[Reduction] | None,
        state: Utf8State,
    ) -> _Transition:
        """Nodes after `byte`.  With `reds` None (dry run) every structurally possible node is
        kept; otherwise nodes and children with zero mass are dropped."""
        out = _Transition()
        n = len(text)
        for i, node in enumerate(nodes):
            partial = text[node.start :] + bytes([byte])
            if reds is None:
                lo, hi = self.table.prefix_range(partial)
                w, exact_lp = (0.0 if lo < hi else NEG_INF), 0.0
            else:
                w = node.logmass + float(reds[i].cont_lp[byte])
                exact_lp = float(reds[i].exact_lp[byte])
            if w == NEG_INF:
                continue
            # A node whose partial is a whole token and no longer token extends it has no
            # future: it stays in this step's mass but leaves the node set.
            grows = self.table.extensions(partial) > 0
            out.covering.append((node, w, node.logmass + exact_lp, grows))
            tid = self.table.exact_id(partial) if exact_lp > NEG_INF else None
            if tid is not None:
                out.children.append(CoverNode(node.path + (tid,), n + 1, node.logmass + exact_lp))
        new_state = state.push(byte)
        if self.mode == "canonical" and out.children and new_state.complete:
            grown = text + bytes([byte])
            keys = self._admissible(grown, full=False)
            if any(_key(c.path) not in keys for c in out.children) and self.probes:
                keys = self._admissible(grown, full=True)
            out.children = [c for c in out.children if _key(c.path) in keys]
        return out

    def _admissible(self, text: bytes, *, full: bool) -> frozenset[_PathKey]:
        """Keys of the valid paths that end exactly at the end of `text` (complete UTF-8):
        root + encode(text), and with `full` also, for each probe continuation z, the path
        that follows the pre-tokenization of text + z: root + encode(text[:b]) +
        encode(text[b:]), b being that pre-tokenization's last boundary before the end.
        Memoized per position until the tree passes it, so a prefetch dry run and the real
        pass encode each position once (the memo holds three ints per key, not paths)."""
        memo = self._targets.get(len(text))
        if memo is not None and (memo[0] or not full):
            return memo[1]
        keys = {_key(self._root + tuple(self._canonical(text)))}
        if full:
            n = len(text)
            start = _window_start(text, n - 4 * self._canon.window)
            for b in sorted(set(self._probe_bounds(text, start)), reverse=True):
                head = self._canonical(text[:b]) if b > 0 else []
                keys.add(_key(self._root + tuple(head) + tuple(self.table.encode(text[b:]))))
        result = frozenset(keys)
        self._targets[len(text)] = (full, result)
        return result

    def _probe_bounds(self, text: bytes, start: int) -> list[int]:
        """For each probe z: the last pre-token boundary (absolute offset) before len(text)
        in the pre-tokenization of text[start:] + z."""
        n = len(text)
        out = []
        for z in self.probes:
            bounds = self.table.pretoken_bounds(text[start:] + z.encode())
            before = [start + b for b in bounds if start + b < n]
            if before:
                out.append(before[-1])
        return out

    def _canonical(self, text: bytes) -> list[int]:
        before = self._canon.full_encodes
        toks = self._canon.tokens(text)
        if self._canon.full_encodes > before:
            self.stats.canonical_full_encodes += 1
        else:
            self.stats.canonical_window_encodes += 1
        return toks

    def advance(self, byte: int) -> float:
        """Consume one byte; returns its normalized log-probability log p(byte | text)."""
        if not 0 <= byte < 256:
            raise ValueError("advance takes a byte value 0..255 (stop ends the stream)")
        step = self._ensure_step()
        lp = float(step.logp[byte])
        if lp == NEG_INF and self._can_rebuild():
            # Pruning removed every cover that continues with this byte (the ensemble may
            # still pick it from another member).  Rebuild exactly over a recent window.
            self._rebuild()
            step = self._ensure_step()
            lp = float(step.logp[byte])
        if lp == NEG_INF:
            raise ZeroProbabilityError(f"byte {byte:#04x} has probability zero here")
        text = bytes(self._text)
        tr = self._transition(self._nodes, text, byte, step.reductions, self._utf8)
        if self.prune > 0.0:
            self._nodes, self._logv, created = self._pruned(tr)
        else:
            self._nodes, self._logv = tr.nodes, _lse([c[1] for c in tr.covering])
            created = len(tr.children)
        self.stats.new_paths += created
        self._text.append(byte)
        self._utf8 = self._utf8.push(byte)
        self._step = None
        self._targets.pop(len(self._text), None)
        if len(self._text) >= self._horizon and self._prefetched:
            # Past the prefetched stretch: what is left was for nodes that pruning dropped.
            wanted = set(self._queries())
            self._prefetched = {q: r for q, r in self._prefetched.items() if q in wanted}
        return lp

    def extend(self, data: bytes, *, prefetch: bool = True) -> NDArray[np.float64]:
        """Consume `data`; returns the log-probability of each byte.  With `prefetch` the
        queries of every position (and of the position after the last byte) go to the oracle
        in one call."""
        if prefetch and data:
            self.prefetch(data)
        return np.array([self.advance(b) for b in data], dtype=np.float64)

    def prefetch(self, data: bytes) -> None:
        """Fetch, in one oracle call, every reduction needed to consume `data` and to predict
        the byte after it.  The node structure depends only on the bytes and the tokenizer,
        so a dry run finds all queries (a superset of what pruning will keep)."""
        nodes = list(self._nodes)
        text = bytes(self._text)
        state = self._utf8
        queries: list[ReductionQuery] = []
        for pos, byte in enumerate(data):
            if pos > 0 or self._step is None:
                queries += [ReductionQuery(n.path, text[n.start :]) for n in nodes]
            nodes = self._transition(nodes, text, byte, None, state).nodes
            text += bytes([byte])
            state = state.push(byte)
        queries += [ReductionQuery(n.path, text[n.start :]) for n in nodes]
        self._horizon = len(text)
        self._fetch(queries)

    def _pruned(self, tr: _Transition) -> tuple[list[CoverNode], float, int]:
        """Apply the relative threshold.  A node's weight splits into its *future* (tokens
        longer than the new partial: every later cover through this node comes from there),
        the valid child completed at the new byte, and dead mass (tokens ending here that are
        not valid), which is leak, not pruning.  Futures and children below `prune` of the
        prefix mass are dropped (the largest part always stays, so the tree never empties)
        and booked as pruned mass.  Returns (nodes, log retained mass, children kept)."""
        total = _lse([c[1] for c in tr.covering])
        floor = total + math.log(self.prune)
        growing = [c for c in tr.covering if c[3]]
        futures = [_log_sub(w, e) for _, w, e, _ in growing]
        parts = futures + [c.logmass for c in tr.children]
        keep = [v >= floor for v in parts]
        if parts:
            keep[max(range(len(parts)), key=parts.__getitem__)] = True
        lost = [v for v, k in zip(parts, keep, strict=True) if not k and v > NEG_INF]
        nodes = [c[0] for c, k in zip(growing, keep, strict=False) if k]
        children = [c for c, k in zip(tr.children, keep[len(growing) :], strict=True) if k]
        if not lost:
            return nodes + children, total, len(children)
        pruned = _lse(lost)
        self.stats.pruned_mass += math.exp(pruned - total)
        self.stats.pruned_logmass = float(np.logaddexp(self.stats.pruned_logmass, pruned))
        return nodes + children, _log_sub(total, pruned), len(children)

    def _rebuild(self) -> None:
        """Restart from the canonical encoding of the text, cut at a token boundary a few
        tokens before the earliest place a cover can start, and replay the rest without
        pruning (one oracle call).  Masses are from then on conditioned on that prefix: an
        approximation, used only when pruning would otherwise end the stream."""
        text = bytes(self._text)
        end = len(text)
        while end > self._skip and not is_complete(text[:end]):
            end -= 1
        toks = self._canonical(text[:end]) if end > 0 else []
        # Every replayed byte costs a forward per new path, unpruned.  The cut used to be two
        # maximal tokens before the end: 96 bytes of Gemma-3 text, 162 of SmolLM2's (its
        # longest token is 81 bytes), ~100-130 forwards a rebuild.  Covers reach back only to
        # where some token still starts with the rest of the text (the current word, in
        # prose); the cut is REBUILD_MARGIN_TOKENS canonical tokens before that, so the
        # tokens ahead of it are settled (GPT-2 splits that move back over a character, like
        # "we'l" -> we|'|l but "we'll" -> we|'ll, stay inside the margin).
        reach = self._earliest_cover_start(text)
        bounds = [0]
        for tid in toks:
            bounds.append(bounds[-1] + len(self.table.token_bytes(tid)))
        settled = max(i for i, b in enumerate(bounds) if b <= reach)
        k = max(0, settled - REBUILD_MARGIN_TOKENS)
        d = bounds[k]
        if d < self._skip:  # never cut inside the consumed dummy-prefix space
            k, d = 0, 0
        self.stats.recoveries += 1
        self._nodes = [CoverNode(self._root + tuple(toks[:k]), d, 0.0)]
        self._logv = 0.0
        self._step = None
        self._text = bytearray(text[:d])
        self._utf8 = Utf8State()
        self._targets.clear()
        prune, self.prune = self.prune, 0.0
        self._rebuilding = True
        try:
            self.extend(text[d:])
        finally:
            self.prune = prune
            self._rebuilding = False

    def _earliest_cover_start(self, text: bytes) -> int:
        """The first offset j from which some vocabulary token starts with text[j:]: no
        cover of `text` starts before it."""
        for j in range(max(self._skip, len(text) - self.table.max_token_bytes), len(text)):
            lo, hi = self.table.prefix_range(text[j:])
            if lo < hi:
                return j
        return len(text)

    def score(self, data: bytes) -> float:
        """Total log-probability of `data` (consumed)."""
        return float(self.extend(data).sum())

    def append_context(self, token_ids: Sequence[int]) -> None:
        """Append fixed tokens (e.g. the chat template after the user's text).  The text so far
        must end on a character boundary; its canonical encoding followed by `token_ids`
        becomes the new root, and byte positions restart at 0."""
        if not self._utf8.complete:
            raise ValueError("append_context needs the text to end on a character boundary")
        toks = self._canonical(bytes(self._text)) if self._text else []
        stats = self.stats
        self._reset(self._root + tuple(toks) + tuple(int(t) for t in token_ids))
        self.stats = stats


def _log_sub(a: float, b: float) -> float:
    """log(exp(a) - exp(b)) for a >= b (clamped at -inf)."""
    if b == NEG_INF:
        return a
    if b >= a:
        return NEG_INF
    return a + math.log1p(-math.exp(b - a))
