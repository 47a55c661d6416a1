"""Per-GPU memory of a training run, estimated from the model's shape and the run's options.

A planning tool (`bench/memory_model.py` prints the table of docs/training.md), not a measurement.
What it counts, per process, in bytes:

- master weights: float32 trainable parameters (`--pure-bf16`: bf16), divided over FSDP shards;
- gradients (float32) and AdamW's two moments (float32), likewise sharded; the gradients stay
  allocated between steps (the loop frees them only at the next update's zero_grad);
- the compute copy: bf16 weights made while they are used. Without FSDP, autocast caches a bf16
  copy of every weight inside its region (2 bytes per parameter); under FSDP2, generation gathers
  every unit at once (2 bytes per parameter, cppo.rl.fsdp.gathered) and the update gathers one or
  two units at a time;
- the frozen reference (beta > 0) in bf16, full on every process (today's trainer), sharded or on
  the CPU;
- the KV cache of one `generate` call: 2 (K and V) x layers x KV heads x head dim x 2 bytes per
  token, for every row of the call over prompt + response tokens;
- activations of one micro-batch, for every pass alive before its backward (GRPO 1, CPPO up to 3:
  anchor, I-, I+): per token and decoder layer about 22·h + 4·(h + 2·kv) + 8·I bytes without
  gradient checkpointing (float32 residual stream and norms, bf16 projections and MLP; 3B width:
  ~141 KiB, against 104-140 KiB measured with a 3B-width block on CPU), and the float32 layer
  input (4·h) per layer with checkpointing plus one layer's full activations in the recompute;
- the output head's float32 chunk: 3 x chunk x V x 4 bytes.

The peak is the larger of the generation phase (weights, gradients, optimizer, reference, gathered
weights, KV cache) and the update phase (the same without the KV cache, with activations and head
chunks). Letters: h hidden size, I MLP width, V vocabulary, kv = KV heads x head dim.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Qwen2.5-VL model that its memory depends on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    vision_hidden: int = 1280
    vision_depth: int = 32
    vision_intermediate: int = 3420
    tied: bool = False

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a `Qwen2_5_VLConfig` (or its dict's text/vision parts as attributes)."""
        t, v = config.text_config, config.vision_config
        return cls(
            hidden=t.hidden_size,
            layers=t.num_hidden_layers,
            heads=t.num_attention_heads,
            kv_heads=t.num_key_value_heads,
            intermediate=t.intermediate_size,
            vocab=t.vocab_size,
            vision_hidden=v.hidden_size,
            vision_depth=v.depth,
            vision_intermediate=v.intermediate_size,
            tied=bool(getattr(config, "tie_word_embeddings", False) or t.tie_word_embeddings),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def text_params(self) -> int:
        h, kv, inter = self.hidden, self.kv_dim, self.intermediate
        attn = (h * h + h) + 2 * (h * kv + kv) + h * h  # q (bias), k, v (bias), o
        layer = attn + 3 * h * inter + 2 * h  # + gate/up/down, two norms
        head = 0 if self.tied else self.vocab * h
        return self.vocab * h + self.layers * layer + h + head

    def vision_params(self) -> int:
        d, inter = self.vision_hidden, self.vision_intermediate
        block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * (d * inter + inter) + (inter * d + d)
        merged = 4 * d  # spatial merge 2 x 2
        merger = d + (merged * merged + merged) + (merged * self.hidden + self.hidden)
        patch = 3 * 2 * 14 * 14 * d  # channels x temporal x patch x patch, no bias
        return patch + self.vision_depth * block + merger

    def params(self) -> int:
        return self.text_params() + self.vision_params()

    def kv_bytes_per_token(self, compute_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_dim * compute_bytes  # K and V

    def activation_bytes_per_token_layer(self, checkpointing: bool, compute_bytes: int = 2) -> int:
        """Saved for the backward of one decoder layer, per token: the float32 residual stream and
        norm inputs (4 tensors of h), the norm outputs, attention input/output, q/k/v, and the MLP's
        gate, up, activation and down inputs in the compute dtype (bf16: 22·h + 4·(h + 2·kv) + 8·I)."""
        h, kv, inter, c = self.hidden, self.kv_dim, self.intermediate, compute_bytes
        if checkpointing:
            return 4 * h  # the float32 layer input kept for the recompute
        return 16 * h + 3 * h * c + 2 * (h + 2 * kv) * c + 4 * inter * c


# Qwen2.5-VL-3B/7B-Instruct's published config.json sizes.
SHAPES = {
    "3b": ModelShape(
        hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008, vocab=151936, tied=True
    ),
    "7b": ModelShape(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064),
}


@dataclass(frozen=True)
class RunShape:
    """The options of a run that memory depends on (per process unless said otherwise)."""

    gpus: int = 1
    fsdp: bool = False
    pure_bf16: bool = False
    reference: str = "full"  # full | sharded | cpu | none
    generate_rows: int = 320  # rows in one generate call
    micro_rows: int = 8
    prompt_tokens: int = 512
    response_tokens: int = 4096
    passes: int = 3  # forward passes alive before one backward: GRPO 1, CPPO up to 3
    checkpointing: bool = True
    compute_bytes: int = 2  # bf16 compute; 4 for float32 (the CPU default)
    chunk: int = 256  # output-head positions per chunk
    trainable_fraction: float = 1.0  # LoRA: the adapter's share of the parameters


def estimate(model: ModelShape, run: RunShape) -> dict[str, float]:
    """Bytes per process of each part, and `peak` (see the module docstring)."""
    P = model.params()
    trainable = P * run.trainable_fraction
    shards = run.gpus if run.fsdp else 1
    master = (2 if run.pure_bf16 else 4) * (trainable / shards) + 2 * (P - trainable)  # frozen in bf16
    grads = (2 if run.pure_bf16 else 4) * trainable / shards
    optimizer = (4 if run.pure_bf16 else 8) * trainable / shards
    reference = {"full": 2 * P, "sharded": 2 * P / run.gpus, "cpu": 0.0, "none": 0.0}[run.reference]
    c = run.compute_bytes
    casts = c < 4 and not run.pure_bf16  # weights are cast to the compute dtype while used
    gathered = c * P if run.fsdp else (c * P if casts else 0.0)  # while generating
    per_unit = c * P / max(1, model.layers + model.vision_depth)
    update_copy = 2 * per_unit if run.fsdp else (c * trainable if casts else 0.0)
    tokens = run.prompt_tokens + run.response_tokens
    kv_cache = model.kv_bytes_per_token(c) * run.generate_rows * tokens
    per_layer = model.activation_bytes_per_token_layer(run.checkpointing, c) * run.micro_rows * tokens
    activations = run.passes * per_layer * model.layers
    if run.checkpointing:  # one layer recomputed in full during the backward
        activations += model.activation_bytes_per_token_layer(False, c) * run.micro_rows * tokens
    head = 3 * run.chunk * model.vocab * 4
    states = master + grads + optimizer + reference
    generation = states + gathered + kv_cache
    update = states + update_copy + activations + head
    return {
        "params": float(P),
        "master_weights": master,
        "gradients": grads,
        "optimizer": optimizer,
        "reference": reference,
        "compute_copy": max(gathered, update_copy),
        "kv_cache": kv_cache,
        "activations": activations,
        "head_chunk": float(head),
        "peak_generation": generation,
        "peak_update": update,
        "peak": max(generation, update),
    }


def describe(run: RunShape) -> str:
    """One line of the options, for tables."""
    return ", ".join(f"{k}={v}" for k, v in asdict(run).items())
