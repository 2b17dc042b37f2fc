"""Name -> implementation registries through which a request chooses a method, and the
catalogue of every method Falconet has.

A request names a speculative method (`SamplingParams(speculative=...)`, the server's
`speculative` field) or a decoding strategy; the name is looked up here, so an unknown name
fails at submission with the list of valid ones instead of deep inside the engine. Method
classes carry their catalogue fields (name, paper, exact); the built-in ones are registered on
first use, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from falconet.errors import FalconetError


class Registry:
    """Implementations of one kind of method, by name."""

    def __init__(self, kind: str, loader: Callable[[Registry], None] | None = None):
        self.kind = kind  # e.g. "speculative method", used in error messages
        self._entries: dict[str, Any] = {}
        self._loader = loader

    def _load(self) -> None:
        if self._loader is not None:
            loader, self._loader = self._loader, None
            loader(self)

    def register(self, name: str, implementation: Any) -> Any:
        """Add `implementation` under `name`; returns it, so it also works as a decorator's body."""
        self._load()
        if not name or name in self._entries:
            raise ValueError(f"{self.kind} name {name!r} is empty or already registered")
        self._entries[name] = implementation
        return implementation

    def unregister(self, name: str) -> None:
        self._load()
        self._entries.pop(name, None)

    def lookup(self, name: str) -> Any:
        self._load()
        if name not in self._entries:
            valid = ", ".join(sorted(self._entries)) or "none (no method of this kind is registered yet)"
            raise FalconetError(f"unknown {self.kind} {name!r}; valid: {valid}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)


def _builtin_speculative(registry: Registry) -> None:
    from falconet.methods.speculative.disco import DiscoProposer
    from falconet.methods.speculative.draft_model import DraftModelProposer
    from falconet.methods.speculative.dyspec import DySpecProposer
    from falconet.methods.speculative.eagle import EagleProposer, EagleTreeProposer
    from falconet.methods.speculative.hidden_transfer import HiddenTransferProposer
    from falconet.methods.speculative.layer_skip import LayerSkipProposer
    from falconet.methods.speculative.lookahead import LookaheadProposer
    from falconet.methods.speculative.ngram import NgramProposer, NgramTreeProposer
    from falconet.methods.speculative.ouroboros import OuroborosProposer
    from falconet.methods.speculative.pearl import PearlProposer
    from falconet.methods.speculative.ppd import PPDProposer
    from falconet.methods.speculative.rsd import RecursiveSpeculativeProposer
    from falconet.methods.speculative.smartspec import SmartSpecProposer, SmartSpecRecyclingProposer
    from falconet.methods.speculative.specdecpp import SpecDecPlusPlusProposer
    from falconet.methods.speculative.spectr import SpecTrProposer
    from falconet.methods.speculative.tetris import TetrisProposer
    from falconet.methods.speculative.token_recycling import NgramRecyclingProposer, TokenRecyclingProposer

    for cls in (
        NgramProposer,
        NgramTreeProposer,
        DraftModelProposer,
        LayerSkipProposer,
        EagleProposer,
        EagleTreeProposer,
        SpecTrProposer,
        RecursiveSpeculativeProposer,
        DySpecProposer,
        SmartSpecProposer,
        TetrisProposer,
        LookaheadProposer,
        SpecDecPlusPlusProposer,
        PearlProposer,
        DiscoProposer,
        OuroborosProposer,
        PPDProposer,
        HiddenTransferProposer,
        TokenRecyclingProposer,
        NgramRecyclingProposer,
        SmartSpecRecyclingProposer,
    ):
        registry._entries[cls.name] = cls


SPECULATIVE_METHODS = Registry("speculative method", _builtin_speculative)


def _builtin_quantization(registry: Registry) -> None:
    from falconet.methods.quant.bfp_kv import BfpKVCache, BfpKVCacheKSort
    from falconet.methods.quant.int4 import Int4G64WeightOnly, Int4G128WeightOnly, Int4WeightOnly
    from falconet.methods.quant.int8 import Int8WeightOnly

    for cls in (
        Int8WeightOnly,
        Int4WeightOnly,
        Int4G64WeightOnly,
        Int4G128WeightOnly,
        BfpKVCache,
        BfpKVCacheKSort,
    ):
        registry._entries[cls.name] = cls


QUANTIZATION_METHODS = Registry("quantization method", _builtin_quantization)
DECODING_STRATEGIES = Registry("decoding strategy")


@dataclass(frozen=True)
class MethodInfo:
    kind: str  # "speculative", "scheduling", "batching", "kv", ...
    name: str
    paper: str
    exact: bool  # True: outputs are exactly the baseline's; False: approximate (reports its loss)
    summary: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


# Methods built into the engine itself: always on, or switched by an engine setting.
ENGINE_METHODS = (
    MethodInfo("kv", "paged-attention", "PagedAttention / vLLM (Kwon et al., 2023)", True,
               "KV cache in fixed-size blocks with reference counts; attention over block tables"),
    MethodInfo("kv", "prefix-caching", "Automatic prefix caching (vLLM); SGLang (Zheng et al., 2023)", True,
               "full KV blocks keyed by a hash chain of their tokens are reused across requests"),
    MethodInfo("batching", "continuous-batching", "Orca (Yu et al., 2022)", True,
               "requests join and leave the running batch at every step"),
    MethodInfo("batching", "prepacking", "Prepacking (Zhao et al., 2024)", True,
               "fresh prompts packed into one sequence, positions restarted, no padding"),
    MethodInfo("scheduling", "chunked-prefill", "SARATHI (Agrawal et al., 2023)", True,
               "prompts split into chunks that share steps with decodes under one token budget"),
    MethodInfo("scheduling", "stall-free-batching", "Sarathi-Serve (Agrawal et al., 2024)", True,
               "running decodes are scheduled first; new prefills fill what budget is left"),
)  # fmt: skip


def catalogue() -> list[MethodInfo]:
    """Every method Falconet has, of every kind."""
    methods = list(ENGINE_METHODS)
    for name in SPECULATIVE_METHODS.names():
        cls = SPECULATIVE_METHODS.lookup(name)
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        methods.append(MethodInfo("speculative", name, cls.paper, cls.exact, summary))
    for name in QUANTIZATION_METHODS.names():
        cls = QUANTIZATION_METHODS.lookup(name)
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        methods.append(MethodInfo("quantization", name, cls.paper, cls.exact, summary))
    for name in DECODING_STRATEGIES.names():
        cls = DECODING_STRATEGIES.lookup(name)
        methods.append(MethodInfo("decoding", name, getattr(cls, "paper", ""), getattr(cls, "exact", False)))
    return methods
