"""Falconet: an LLM inference engine with the research literature's methods as pluggable parts."""

from falconet.api import LLM, CompletionOutput, RequestOutput
from falconet.errors import FalconetError
from falconet.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "FalconetError"]
__version__ = "0.1.0"
