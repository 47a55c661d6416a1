"""cppo.loss: the maths of CPPO as pure tensor functions: the perception-token selection, the
Contrastive Perception Loss and the GRPO losses.

Tensors in, ``(loss, metrics)`` out; no model or config object. Letters used in every docstring:
B prompts, G group size, N = B * G responses, T response tokens, V vocabulary.

Modules: ``entropy`` (per-token entropy, chunked entropy/log-prob/KL through the output head),
``select`` (selectors and the per-response top-k rule, docs/method.md §2), ``mask`` (selection
times a response gate), ``divergence``, ``agg``, ``cpl``, ``grpo``, ``papo``; ``step`` (the CPL step
of a batch, gate -> I- -> mask -> I+ -> CPL, that both trainers call) and ``settings`` (its
settings, the dataclass both trainers' configs inherit). ``cppo.detect`` and the
trainer call these; nothing here imports them.

Registries (one way, see ``cppo.registry``): ``SELECTORS``, ``DIVERGENCES``, ``AGGREGATIONS``,
``POLICY_LOSSES``, ``GATES``.

Typical use (docs/method.md §3)::

    adv = group_advantages(rewards, G)                                          # (N,)
    pg, m1 = grpo_loss(old_logp, logp, adv, resp_mask, ref_logp, beta=0.01)
    mask = perception_mask(H, H_minus, resp_mask, adv)                          # (N, T) bool
    cpl, m2 = contrastive_perception_loss(logp, logp_plus, logp_minus, mask)
    loss = pg + 0.01 * cpl

or, with the view passes run by a callable of yours (``cppo.loss.step``)::

    cpl, m2 = cpl_step(logp, H, resp_mask, adv, score_view, CPLSettings())
"""

from cppo.loss.agg import AGGREGATIONS, agg_loss, get_aggregation, register_aggregation
from cppo.loss.cpl import contrastive_perception_loss, contrastive_perception_loss_full, cpl_from_divergences
from cppo.loss.divergence import DIVERGENCES, get_divergence, k1, k2, k3, register_divergence
from cppo.loss.entropy import chunked_entropy_and_logprob, chunked_kl, token_entropy
from cppo.loss.grpo import (
    POLICY_LOSSES,
    get_policy_loss,
    group_advantages,
    grpo_loss,
    kl_to_reference,
    ppo_clip_loss,
    register_policy_loss,
    reinforce_loss,
)
from cppo.loss.mask import GATES, gate_responses, get_gate, perception_mask, register_gate
from cppo.loss.papo import entropy_bonus, implicit_perception_loss
from cppo.loss.select import (
    SELECTORS,
    get_selector,
    register_selector,
    select_perception_tokens,
    top_fraction_per_row,
)
from cppo.loss.settings import CPLSettings
from cppo.loss.step import ViewScorer, cpl_step
from cppo.registry import Registry

__all__ = [
    "AGGREGATIONS",
    "CPLSettings",
    "DIVERGENCES",
    "GATES",
    "POLICY_LOSSES",
    "Registry",
    "SELECTORS",
    "agg_loss",
    "chunked_entropy_and_logprob",
    "chunked_kl",
    "contrastive_perception_loss",
    "cpl_step",
    "contrastive_perception_loss_full",
    "cpl_from_divergences",
    "entropy_bonus",
    "gate_responses",
    "get_aggregation",
    "get_divergence",
    "get_gate",
    "get_policy_loss",
    "get_selector",
    "group_advantages",
    "grpo_loss",
    "implicit_perception_loss",
    "k1",
    "k2",
    "k3",
    "kl_to_reference",
    "perception_mask",
    "ppo_clip_loss",
    "register_aggregation",
    "register_divergence",
    "register_gate",
    "register_policy_loss",
    "register_selector",
    "reinforce_loss",
    "select_perception_tokens",
    "token_entropy",
    "top_fraction_per_row",
    "ViewScorer",
]
