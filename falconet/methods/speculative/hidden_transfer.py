"""Hidden transfer: the target drafts its own next tokens from pseudo hidden states.

Parallel decoding via hidden transfer (Wu et al., 2024, "Parallel Decoding via Hidden Transfer
for Lossless Large Language Model Acceleration"): at an intermediate layer L, trained linear maps
W_1..W_m (`falconet train-transfer`) turn a token's hidden state into pseudo hidden states of the
m tokens after the next one; these run through the target's remaining layers, attending to the
context and to each other, and the LM head reads guesses off them. Here they are PPD's extra rows
(ppd.py: a group under the last token and under each draft, the group under the kept path
drafting the next step) with a different input: at layer L their stream is replaced by
W_j h_anchor + b_j, h_anchor being the stream of the row they hang under. What they compute below
L is never read (their own later rows attend to it only below L, where it is replaced anyway).

Drafts are the argmax of each pseudo row (point masses): exact for greedy and sampled requests.
The paper's tree of several candidates per position is left out, as in ppd.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from falconet.errors import FalconetError
from falconet.methods.speculative.artifacts import read_artifact, save_artifact
from falconet.methods.speculative.base import ExtraInputs
from falconet.methods.speculative.ppd import PPDProposer

MARKER = "falconet_transfer.json"


class TransferLayers(nn.Module):
    """W_1..W_m [m, hidden, hidden] and b [m, hidden], applied to the stream entering `layer`."""

    def __init__(self, num_tokens: int, hidden: int, layer: int):
        super().__init__()
        self.layer = layer
        self.weight = nn.Parameter(torch.eye(hidden).repeat(num_tokens, 1, 1))  # starts as h itself
        self.bias = nn.Parameter(torch.zeros(num_tokens, hidden))

    @property
    def num_tokens(self) -> int:
        return self.weight.shape[0]

    def all_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., m, hidden]: every W_j h + b_j."""
        m, hidden = self.bias.shape
        out = h.to(self.weight.dtype) @ self.weight.reshape(m * hidden, hidden).T
        return out.view(*h.shape[:-1], m, hidden) + self.bias

    def forward(self, h: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """Row i of h [E, hidden] through W_which[i] (all m at once, one matmul: cheaper than
        gathering E matrices)."""
        return self.all_tokens(h)[torch.arange(len(h)), which]


class TransferInputs(ExtraInputs):
    """At the transfer layer, each extra row's stream becomes W_j h_anchor + b_j."""

    def __init__(self, transfer: TransferLayers, anchors: list[int], which: list[int]):
        self.transfer = transfer
        self.anchors = torch.tensor(anchors)  # segment rows
        self.which = torch.tensor(which)

    def edit(self, layer, x, residual, first, rows) -> None:
        if layer != self.transfer.layer:
            return
        anchors = first + self.anchors
        h = x[anchors] if residual is None else x[anchors] + residual[anchors]
        new = self.transfer(h, self.which).to(x.dtype)
        if residual is None:
            x[rows] = new
        else:  # the stream is residual + x: the layer's norm adds them
            residual[rows] = new
            x[rows] = 0


def default_transfer_path(model_path) -> Path:
    """Where `falconet train-transfer` saves for a model by default (and `hidden-transfer` looks)."""
    from falconet.models.catalog import falconet_home

    return falconet_home() / "heads" / f"{Path(model_path).stem}-transfer"


def save_transfer(path: Path, transfer: TransferLayers, config, info: dict) -> None:
    tensors = {"weight": transfer.weight, "bias": transfer.bias, "layer": torch.tensor(transfer.layer)}
    save_artifact(path, tensors, config, MARKER, info)


def load_transfer(path, model) -> TransferLayers:
    _, tensors = read_artifact(path, "set of hidden-transfer layers", model.config)
    try:
        weight, bias, layer = tensors["weight"], tensors["bias"], int(tensors["layer"])
    except KeyError as e:
        raise FalconetError(f"{path}: no {e} in these transfer layers") from None
    if not 0 <= layer < model.config.num_layers:
        raise FalconetError(f"{path}: transfer layer {layer} is not a layer of this model")
    transfer = TransferLayers(weight.shape[0], weight.shape[1], layer)
    transfer.load_state_dict({"weight": weight, "bias": bias})
    return transfer.to(model.embed_tokens.weight.dtype).requires_grad_(False)


class HiddenTransferProposer(PPDProposer):
    """Hidden transfer (Wu et al., 2024): pseudo hidden states of future tokens, transferred from
    an intermediate layer's, run through the target's later layers in the verify forward."""

    name = "hidden-transfer"
    paper = (
        "Parallel Decoding via Hidden Transfer for Lossless Large Language Model Acceleration "
        "(Wu et al., 2024)"
    )
    marker, command, default_path = MARKER, "falconet train-transfer", staticmethod(default_transfer_path)

    def load(self, path) -> None:
        self.transfer = load_transfer(path, self.engine.model)
        self.num_prompt_tokens = self.transfer.num_tokens

    def inputs(self, lengths: list[int]) -> ExtraInputs:
        anchors = [g for g, m in enumerate(lengths) for _ in range(m)]  # group g hangs under row g
        return TransferInputs(self.transfer, anchors, [j for m in lengths for j in range(m)])
