"""``mdu-dist plan``: per-GPU memory of every TP x PP x DP layout and ZeRO choice, without allocating a model.

Parameter counts per rank come from the real TP/PP sharding of the model built on the meta device
(``mcore_layout.shard``), so vocabulary padding, the QKV/SwiGLU layouts and the embedding/head placement are
exactly those of a run. The byte counts are a model of what a run holds, per GPU of pipeline stage r, with
P = parameters of that stage's TP rank:

    parameters     2 P            bf16; ZeRO-3 partitions them: 2 P / DP
    gradients      2 P            bf16; ZeRO-2/3 partition them: 2 P / DP
    optimizer     12 P / DP       fp32 master + Adam m + v, partitioned over DP by every ZeRO stage;
                                  with offload_optimizer=cpu they live in host memory instead (reported apart)
    reference      2 P            theta_0 of MDU/NPO/DPO: bf16, sharded like the policy, never ZeRO-partitioned
    activations    in_flight x layers_per_stage x A(policy tokens)  +  one layer's A(reference tokens)
                   + (last stage) masked-position logits

A(n tokens) = 2 bytes x n x [4h + (2h + 2kv + 4f + S) / t] is what one layer keeps for its backward, in bf16
elements per token: the inputs of both norms and of the column-parallel linears (4h, replicated over TP), the
attention context entering linear_proj (h/t), q, k and v after RoPE ((h + 2kv)/t), fc1's gate and up
outputs, silu(gate) and the product entering fc2 (4f/t), and the core attention's own state S: the softmax
probabilities with megatron's unfused ``local`` attention (S = a s), SDPA's / TE's fp32 log-sum-exp per head
with the fused kernels (S = 2a); h hidden, kv = KV heads x head dim, f ffn size, a heads, s sequence length,
t TP size. With ``train.recompute``: ``selective`` recomputes the core attention (S = 0); ``full`` keeps only
each layer's input (2 n h bytes per layer) and one layer's A, recomputed in the backward, on top. The
reference (anchor) pass runs under no_grad and keeps nothing; its transient working set, one layer's worth,
is alive on top of the policy's stored activations. Under the 1F1B schedule stage r holds PP - r
micro-batches in flight. The CPU's math path of SDPA does keep probabilities; the plan models GPUs. Logits exist only at masked response positions
(N = masked fraction x tokens per pass): each pass's bf16 [N, V/t] logits, the policy passes' logit
gradients, and the divergence kernel's fp32 chunk buffers (3 x chunk x V/t, chunk = 32 MiB of fp32 rows).

A mixture-of-experts layer (LLaDA2, LLaDA-MoE; TP = 1) replaces the 4f of the MLP by what each token keeps in
the experts it is routed to and in the shared expert, plus its copies in the allgather dispatcher and the fp32
router scores: A_moe(n) = 2 bytes x n x [4h + 2h + 2kv + S + k (4 f_e + h) + 4 f_s] + 8 bytes x n x E (k experts
of width f_e out of E, shared width f_s). Every expert of a stage lives on each of its ranks (no expert
parallelism: ``parallel.expert``), so the routed experts' share of the parameters is what PP and ZeRO split.

With LoRA (``lora.rank`` > 0), with Pa = adapter parameters of that stage's TP rank (``models.lora``):

    parameters     2 P + 2 Pa     the frozen base and the adapters, bf16 (ZeRO-3 is refused with LoRA)
    gradients      2 Pa           adapters only; ZeRO-2 partitions them: 2 Pa / DP
    optimizer     12 Pa / DP      adapters only
    reference      0              the policy with its adapters off (2 P with lora.reference=copy)
    activations    as above       the frozen linears no longer need their input for a weight gradient, but the
                                  adapters read the same inputs: the same bytes are counted

In the block layout (``data.layout=block``) a row runs as [x_t ; x_0], 2 s positions: every term above counts
2 s (the attention's ``local`` state a x 2s per position), except the logits, read at x_t's masked positions.

Not modelled: DeepSpeed communication buckets, ZeRO-3's gathered layer, the CUDA context and allocator
fragmentation; leave a margin of several GB below --gpu-mem.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mdu_dist.checkpoint.source import load_job_config
from mdu_dist.config import Config, LoRAConfig, ModelConfig
from mdu_dist.data import Pairs
from mdu_dist.errors import ConfigError
from mdu_dist.losses.divergence import chunk_rows
from mdu_dist.layout import Layout
from mdu_dist.methods import job_objective
from mdu_dist.models.arch import is_moe_layer
from mdu_dist.models.dense import count_active_parameters, count_parameters, init_weights
from mdu_dist.models.lora import adapter_parameters
from mdu_dist.models.mcore_layout import layer_range, shard

GIB = 2**30
BF16, FP32 = 2, 4
ADAM_BYTES = 12  # fp32 master + two fp32 moments per parameter
# The forward-KL kernel's float32 working set, in chunk x V_local buffers (bounded in tests/test_divergence.py).
LOSS_CHUNK_BUFFERS = 3
MAX_TP = 8  # a TP group stays inside one node


@dataclass(frozen=True)
class Workload:
    """What one micro-batch runs: rows per pass, sequence length, passes with and without gradient."""

    micro_batch_size: int
    seq_len: int
    masked_fraction: float
    policy_passes: int
    reference_passes: int
    recompute: str = "none"  # train.recompute
    # 2 in the block layout (data.layout=block): each pass runs [x_t ; x_0], 2 x seq_len positions, while the
    # logits are read at x_t's masked positions only.
    copies: int = 1

    @property
    def positions(self) -> int:
        """Positions one row occupies in a forward pass."""
        return self.copies * self.seq_len


@dataclass
class Row:
    tp: int
    pp: int
    dp: int
    zero: int
    offload: str
    stage: int  # the pipeline stage with the largest total
    params: int
    grads: int
    optimizer: int
    reference: int
    activations: int
    total: int
    host_optimizer: int  # bytes of optimizer state in host memory (offload), per GPU
    fits: bool


def stage_parameters(cfg: ModelConfig, tp: int, pp: int) -> list[int]:
    """Parameters held by one TP rank of each pipeline stage (TP rank 0; all TP ranks hold equal counts)."""
    weights = init_weights(cfg, device="meta")
    return [sum(t.numel() for t in shard(cfg, weights, tp, 0, pp, r).values()) for r in range(pp)]


def layer_activation_bytes(cfg: ModelConfig, tp: int, tokens: int, seq_len: int, recompute: str = "none",
                           layer: int = 0) -> int:
    """A(tokens): what layer ``layer`` keeps for its backward (formulas in the module docstring); with
    ``recompute="selective"`` without the core attention's state."""
    h, f, a = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads
    kv = cfg.num_query_groups * cfg.head_dim
    attention_state = 0 if recompute == "selective" else a * seq_len if cfg.attention == "local" else 2 * a
    if not is_moe_layer(cfg, layer):
        return int(BF16 * tokens * (4 * h + (2 * h + 2 * kv + 4 * f + attention_state) / tp))
    routed = cfg.moe_topk * (4 * cfg.moe_ffn_hidden_size + h) + 4 * cfg.moe_shared_ffn_hidden_size
    return int(BF16 * tokens * (4 * h + 2 * h + 2 * kv + attention_state + routed)
               + 2 * FP32 * tokens * cfg.moe_num_experts)


def logits_bytes(cfg: ModelConfig, tp: int, w: Workload) -> int:
    v_local = cfg.padded_vocab_size(tp) // tp
    n = int(w.masked_fraction * w.micro_batch_size * w.seq_len)
    stored = (w.policy_passes + w.reference_passes) * n * v_local * BF16
    grads = w.policy_passes * n * v_local * BF16
    return stored + grads + LOSS_CHUNK_BUFFERS * min(chunk_rows(v_local), n) * v_local * FP32


def activation_bytes(cfg: ModelConfig, tp: int, pp: int, stage: int, w: Workload) -> int:
    tokens = w.micro_batch_size * w.positions
    own = layer_range(cfg.num_layers, pp, stage)
    in_flight = pp - stage
    largest = max(layer_activation_bytes(cfg, tp, w.policy_passes * tokens, w.positions, layer=i) for i in own)
    if w.recompute == "full":  # each layer's input, plus the one layer being recomputed in the backward
        stored = in_flight * len(own) * BF16 * w.policy_passes * tokens * cfg.hidden_size + largest
    else:
        stored = in_flight * sum(layer_activation_bytes(cfg, tp, w.policy_passes * tokens, w.positions, w.recompute,
                                                        i) for i in own)
    anchor = max(layer_activation_bytes(cfg, tp, tokens, w.positions, layer=i) for i in own) if w.reference_passes else 0
    return stored + anchor + (logits_bytes(cfg, tp, w) if stage == pp - 1 else 0)


def memory_row(cfg: ModelConfig, tp: int, pp: int, dp: int, zero: int, offload: str, w: Workload,
               gpu_mem_gib: float, stage_params: list[int] | None = None, lora: LoRAConfig | None = None) -> Row:
    """The per-GPU memory of the most loaded pipeline stage of one layout and ZeRO choice; with ``lora``
    enabled, of training its adapters only."""
    stage_params = stage_params or stage_parameters(cfg, tp, pp)
    lora = lora if lora is not None and lora.enabled else None
    trainable = adapter_parameters(cfg, lora, tp, cfg.num_layers // pp) if lora else None
    copy = lora is None or lora.reference == "copy"
    rows = []
    for stage, p in enumerate(stage_params):
        t = p if trainable is None else trainable
        params = BF16 * (p + (trainable or 0)) // (dp if zero == 3 else 1)
        grads = BF16 * t // (dp if zero >= 2 else 1)
        optimizer = ADAM_BYTES * t // dp
        reference = BF16 * p if w.reference_passes and copy else 0
        activations = activation_bytes(cfg, tp, pp, stage, w)
        on_gpu_optimizer = 0 if offload == "cpu" else optimizer
        total = params + grads + on_gpu_optimizer + reference + activations
        rows.append(Row(tp, pp, dp, zero, offload, stage, params, grads, on_gpu_optimizer, reference, activations,
                        total, optimizer - on_gpu_optimizer, total <= gpu_mem_gib * GIB))
    return max(rows, key=lambda r: r.total)


def layouts(cfg: ModelConfig, gpus: int) -> list[tuple[int, int, int]]:
    """(TP, PP, DP) with TP dividing the heads, KV heads and ffn (at most MAX_TP), PP dividing the layers."""
    out = []
    for tp in range(1, 2 if cfg.is_moe else MAX_TP + 1):  # MoE layers run at TP = 1 (config.check_layout)
        if cfg.num_attention_heads % tp or cfg.num_query_groups % tp or cfg.ffn_hidden_size % tp:
            continue
        for pp in range(1, cfg.num_layers + 1):
            if cfg.num_layers % pp == 0 and gpus % (tp * pp) == 0:
                out.append((tp, pp, gpus // (tp * pp)))
    return out


def workload(cfg: Config, job: str, micro_batch_size: int, seq_len: int, masked_fraction: float) -> Workload:
    """Count the passes of one micro-batch by asking the objective itself (on a 1 x 1 dummy batch)."""
    m = cfg.model
    objective = job_objective(job, cfg.method, m.mask_token_id, Layout(cfg.data.layout, m.block_size))
    dummy = Pairs(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool))
    drawn = objective.draw({n: dummy for n in ("train", "forget", "retain", "idk")}, torch.Generator())
    passes = objective.passes(drawn)
    n_ref = sum(p.reference for p in passes)
    return Workload(micro_batch_size, seq_len, masked_fraction, len(passes) - n_ref, n_ref, cfg.train.recompute,
                    copies=objective.layout.copies)


def plan(cfg: Config, gpus: int, gpu_mem_gib: float, w: Workload) -> list[Row]:
    rows = []
    for tp, pp, dp in layouts(cfg.model, gpus):
        stage_params = stage_parameters(cfg.model, tp, pp)
        # ZeRO-2/3 are refused with pipeline parallelism (optim.check_pipeline), ZeRO-3 with LoRA.
        for zero in (1,) if pp > 1 else (1, 2) if cfg.lora.enabled else (1, 2, 3):
            for offload in ("none", "cpu"):
                rows.append(memory_row(cfg.model, tp, pp, dp, zero, offload, w, gpu_mem_gib, stage_params,
                                       cfg.lora))
    return rows


def nodes_needed(cfg: Config, w: Workload, gpus_per_node: int, gpu_mem_gib: float, offload: str,
                 max_nodes: int = 64) -> tuple[int, Row] | None:
    """The fewest nodes of ``gpus_per_node`` GPUs on which some layout fits with optimizer offload ``offload``,
    and the smallest-total fitting row there; None if none fits on ``max_nodes``."""
    stage_params: dict[tuple[int, int], list[int]] = {}
    for nodes in range(1, max_nodes + 1):
        fitting = []
        for tp, pp, dp in layouts(cfg.model, nodes * gpus_per_node):
            key = (tp, pp)
            if key not in stage_params:
                stage_params[key] = stage_parameters(cfg.model, tp, pp)
            for zero in (1, 2, 3) if pp == 1 else (1,):
                row = memory_row(cfg.model, tp, pp, dp, zero, offload, w, gpu_mem_gib, stage_params[key])
                if row.fits:
                    fitting.append(row)
        if fitting:
            return nodes, min(fitting, key=lambda r: r.total)
    return None


def experts_share(m: ModelConfig) -> str:
    """One line: how much of the model the routed experts are, and what one token uses."""
    total, active = count_parameters(m), count_active_parameters(m)
    experts = sum(3 * m.hidden_size * m.moe_ffn_hidden_size * m.moe_num_experts
                  for _ in range(m.moe_dense_layers, m.num_layers))
    return (f"routed experts: {experts / 1e9:.2f}e9 of {total / 1e9:.2f}e9 parameters ({experts / total:.1%}), "
            f"all on every rank of their pipeline stage (no expert parallelism); {active / 1e9:.2f}e9 active per "
            f"token ({m.moe_topk} of {m.moe_num_experts} experts)")


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def format_table(rows: list[Row]) -> str:
    head = ("TP", "PP", "DP", "ZeRO", "offload", "stage", "params", "grads", "optim", "ref", "activ", "total",
            "host optim", "fits")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = (r.tp, r.pp, r.dp, r.zero, r.offload, r.stage, _gib(r.params), _gib(r.grads), _gib(r.optimizer),
                 _gib(r.reference), _gib(r.activations), _gib(r.total), _gib(r.host_optimizer),
                 "yes" if r.fits else "no")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_job_config(args.config, args.overrides, args.job)
    if args.gpus < 1 or args.gpu_mem <= 0 or not 0 < args.masked_fraction <= 1:
        raise ConfigError(f"--gpus={args.gpus} must be >= 1, --gpu-mem={args.gpu_mem} > 0 and "
                          f"--masked-fraction={args.masked_fraction} in (0, 1]")
    w = workload(cfg, args.job, args.micro_batch_size or cfg.optim.micro_batch_size,
                 args.seq_len or cfg.data.max_length, args.masked_fraction)
    rows = plan(cfg, args.gpus, args.gpu_mem, w)
    m = cfg.model
    method = "sft" if args.job == "finetune" else cfg.method.name
    print(f"{args.config or '<defaults>'}: {m.arch} {m.num_layers} x {m.hidden_size}, {m.num_attention_heads} "
          f"heads / {m.num_query_groups} KV, ffn {m.ffn_hidden_size}, vocab {m.vocab_size}; "
          f"{count_parameters(m) / 1e9:.2f}e9 parameters"
          + (f", {m.moe_num_experts} experts top-{m.moe_topk}" if m.is_moe else ""))
    print(f"{args.job} ({method}): micro-batch {w.micro_batch_size} x {w.seq_len} tokens"
          + (f" (block layout: {w.positions} positions per row, [x_t ; x_0])" if w.copies > 1 else "") + ", "
          f"{w.policy_passes} policy + {w.reference_passes} reference pass(es), logits at "
          f"{w.masked_fraction:.0%} of positions; {m.attention} attention, recompute {w.recompute}; "
          f"{args.gpus} GPUs of {args.gpu_mem:g} GiB; GiB per GPU:")
    if cfg.lora.enabled:
        lora = cfg.lora
        print(f"LoRA rank {lora.rank} on {', '.join(lora.targets)}: {adapter_parameters(m, lora, 1, m.num_layers):,} "
              f"trainable parameters, the base frozen; reference: "
              f"{'a frozen copy' if lora.reference == 'copy' else 'the policy with its adapters off (no copy)'}")
    print(format_table(rows))
    fitting = [r for r in rows if r.fits]
    print(f"{len(fitting)} of {len(rows)} layouts fit in {args.gpu_mem:g} GiB per GPU"
          + ("" if fitting else " (none: more GPUs, offload, a shorter sequence or a smaller micro-batch)"))
    if m.is_moe:
        print(experts_share(m))
    if args.gpus_per_node:
        for offload in ("none", "cpu"):
            found = nodes_needed(cfg, w, args.gpus_per_node, args.gpu_mem, offload)
            what = f"optimizer offload {offload}: "
            if found is None:
                print(what + f"no layout fits on up to 64 nodes of {args.gpus_per_node} GPUs")
                continue
            nodes, r = found
            print(what + f"{nodes} node(s) of {args.gpus_per_node} x {args.gpu_mem:g} GiB, e.g. TP={r.tp} PP={r.pp} "
                  f"DP={r.dp} ZeRO-{r.zero} at {_gib(r.total)} GiB per GPU")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "workload": asdict(w), "gpus": args.gpus,
                                               "gpu_mem_gib": args.gpu_mem, "rows": [asdict(r) for r in rows]},
                                              indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="per-GPU memory of every TP x PP x DP layout and ZeRO stage/offload choice, "
                                    "and which fit (model built on the meta device)")
    p.add_argument("--config", help="YAML config (default: the built-in tiny defaults)")
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs (default 8)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    p.add_argument("--job", choices=("unlearn", "finetune"), default="unlearn",
                   help="which step to plan: unlearn (the config's method.name) or finetune (SFT)")
    p.add_argument("--micro-batch-size", type=int, help="rows per pass (default optim.micro_batch_size)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default data.max_length)")
    p.add_argument("--masked-fraction", type=float, default=0.5,
                   help="fraction of positions whose logits a loss reads (default 0.5: E[t] over responses)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="also print the fewest nodes of this many GPUs on which a layout fits, with and without "
                        "optimizer offload (default 0: not searched)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides (train.init=DIR: the model's shape from that checkpoint)")
    p.set_defaults(func=cmd_plan)
