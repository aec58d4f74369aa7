"""The draft's starting weights: random (seeded), or the target's own (--draft-init target).

`target` starts the draft as the target's last decoder layer continuing from the top captured layer: `fc`
passes that layer's slice of aux_hidden through unchanged, the midlayer takes the last layer's attention
(on the hidden half of q/k/v; the embedding half stays random), MLP and norms, and the head is the target's
final norm and its lm_head rows of the draft vocabulary. On the same stored features and held-out prompts
(scripts/tune_on_features.py, SmolLM2-135M, 1,586 samples, 3 epochs) it ends at held-out τ̂ 1.796 against
1.739 / 1.743 from two random seeds, most of it at the first draft position (acc_0 0.477 against 0.451). In the
6-epoch quality run it leads by 0.03-0.06 for ~1,300 steps and ends 0.02 ahead (1.86 against 1.84): worth most
in short runs. It starts confidently wrong (the target's layer predicts token t+1, the draft must predict t+2),
so judge it after a few hundred steps, not a few dozen.
Parts of a target layer the draft has no place for (q/k/v biases, q/k norms) are left out: this is a
starting point, trained from like any other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dataflow.errors import InputError
from dataflow.train.eagle3 import Eagle3Draft
from dataflow.train.loss import draft_target_ids
from dataflow.train.target import TargetHead, read_target_tensors


def init_from_target(model: Eagle3Draft, head: TargetHead, model_dir: str | Path, aux_layers: tuple[int, ...]) -> None:
    """Overwrite the draft's trainable weights with the target's (module docstring). The draft's width is the
    target's (build.draft_config checks it), so only a --draft-config shape override can make a tensor not fit."""
    H, last = model.cfg.hidden_size, f"layers.{head.config['num_hidden_layers'] - 1}."
    midlayer, qkv = model.midlayer, ("q_proj", "k_proj", "v_proj")
    targets = {  # the target's tensor name -> the draft's place for it (q/k/v: the hidden half of the input)
        **{f"{last}self_attn.{p}.weight": getattr(midlayer.self_attn, p).weight[:, H:] for p in qkv},
        f"{last}self_attn.o_proj.weight": midlayer.self_attn.o_proj.weight,
        **{f"{last}mlp.{p}.weight": getattr(midlayer.mlp, p).weight for p in ("gate_proj", "up_proj", "down_proj")},
        f"{last}input_layernorm.weight": midlayer.hidden_norm.weight,
        f"{last}post_attention_layernorm.weight": midlayer.post_attention_layernorm.weight,
        "norm.weight": model.norm.weight,
    }
    weights = read_target_tensors(model_dir, list(targets))
    for name, param in targets.items():
        if weights[name].shape != param.shape:
            raise InputError(f"--draft-init target: the target's {name} is {tuple(weights[name].shape)}, the draft's "
                             f"place for it {tuple(param.shape)}; drop --draft-config's shape overrides or use "
                             "--draft-init random")
    top = max(range(len(aux_layers)), key=aux_layers.__getitem__)  # aux_hidden's slice of the top layer
    with torch.no_grad():
        for name, param in targets.items():
            param.copy_(weights[name])
        model.fc.weight.zero_()
        model.fc.weight[:, top * H : (top + 1) * H] = torch.eye(H)
        model.lm_head.weight.copy_(head.lm_head.index_select(0, draft_target_ids(model.d2t)))
