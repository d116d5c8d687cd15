"""The trainable model and its frozen reference (theta_0) as one pipeline stage.

MDU's anchor pass, NPO's and DPO's reference passes run on a frozen copy of the starting weights, sharded in
the same TP/PP groups as the policy. Rather than running the pipeline once per model, every micro-batch stacks
the policy's rows and the reference's rows along the batch dimension; each stage runs the policy on the first
``n_policy`` rows (with autograd) and the reference on the rest (under ``no_grad``, so no activations are
kept), and the pipeline moves one activation tensor per micro-batch. Gradients reach the policy rows only.

With LoRA the reference can instead be the policy itself with its adapters switched off (``adapters_off``):
while only the adapters train, its base weights are theta_0, and no second copy is held.
"""

from __future__ import annotations

import torch
from torch import nn

from mdu_dist.models.lora import adapters_disabled
from mdu_dist.models.mcore import DiffusionLM


class PolicyAndReference(nn.Module):
    def __init__(self, policy: nn.Module, reference: DiffusionLM | None, adapters_off: bool = False):
        super().__init__()
        if adapters_off and reference is not None:
            raise ValueError("a reference copy and adapters_off are exclusive")
        # ``module`` lets megatron-core's get_attr_wrapped_model reach the policy's config and model_type.
        self.module = policy
        self.reference = reference
        self.adapters_off = adapters_off
        if reference is not None:
            reference.requires_grad_(False).eval()
        self._input: torch.Tensor | None = None

    def set_input_tensor(self, tensor) -> None:
        # Later pipeline stages receive [seq, rows, hidden]; the split into policy and reference rows
        # happens in forward, where n_policy is known.
        self._input = tensor[0] if isinstance(tensor, (list, tuple)) else tensor

    @staticmethod
    def _run(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor | None, hidden: torch.Tensor | None,
             position_ids: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        _stage(model).module.set_input_tensor(hidden)
        if position_ids is None and mask is None:
            return model(ids, positions)
        return model(ids, positions, mask=mask, position_ids=position_ids)

    def forward(self, ids: torch.Tensor, n_policy: int, positions: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``ids``, ``positions`` and ``position_ids`` [rows, seq]: rows ``[:n_policy]`` go to the policy, the rest
        to the frozen reference. The last stage returns the logits at ``positions`` ([N, V_local], row-major:
        the policy's first; without ``positions`` all of them, [rows, seq, V_local]), the others hidden states
        [seq, rows, hidden] for the next stage. ``mask`` (bool [1 or rows, 1, seq, seq], True = masked out) and
        ``position_ids`` (RoPE's; default each row's 0..seq-1) reach every stage with the micro-batch, as the
        token ids do: the two-copy layout (``layout``) needs both."""
        def rows(x: torch.Tensor | None, part: slice) -> torch.Tensor | None:
            # A mask of one row is every row's.
            return x if x is None or (x is mask and x.shape[0] == 1) else x[part]

        hidden = self._input
        policy, ref = slice(None, n_policy), slice(n_policy, None)
        policy_hidden = None if hidden is None else hidden[:, policy]
        out = self._run(self.module, ids[policy], rows(positions, policy), policy_hidden, rows(position_ids, policy),
                        rows(mask, policy))
        if n_policy == ids.shape[0]:
            return out
        if self.reference is None and not self.adapters_off:
            raise ValueError(f"{ids.shape[0] - n_policy} reference rows but no reference model was built")
        with torch.no_grad():
            args = (ids[ref], rows(positions, ref), None if hidden is None else hidden[:, ref],
                    rows(position_ids, ref), rows(mask, ref))
            if self.adapters_off:
                stage = _stage(self.module)
                with adapters_disabled(stage):
                    ref_out = self._run(stage, *args)
            else:
                ref_out = self._run(self.reference, *args)
        return torch.cat([out, ref_out], dim=0 if _stage(self.module).post_process else 1)


def _stage(model: nn.Module) -> DiffusionLM:
    """The DiffusionLM inside wrappers such as a DeepSpeed engine."""
    while not isinstance(model, DiffusionLM):
        model = model.module
    return model
