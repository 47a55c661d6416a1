"""How each pass of the update runs: one forward of some rows of a step's rollouts, under the
original images or a view, and the micro-batch a perception term sees (`MicroBatch`).

Every pass runs one function, `Passes.forward` (default cppo.response_stats.response_stats: head on
response positions only, in chunks; a group's image encoded once), on its own rows' tokens: columns
that are padding in all its rows are cut first (`_entropy_and_logp`, cppo.batching.trim_padding;
positions come from the attention mask, so the log-probs are the padded pass's:
tests/test_rl_update.py). The trainer uses the default `Passes()`; benchmarks that measure the
official code's way or the padded path hand `policy_update` and `rollout_logprobs` another
(bench/bench_step.py, bench/bench_padding.py).

A tuple of views is one forward of the rows once per view (CPPO's I- and I+ with gradient); a pass
without gradient runs each distinct prompt once (cppo.response_stats.shared_prompt_hidden). With a
frozen vision tower each image of the step is encoded once and its features reused by every pass
(`Rollouts.image_features`).

FSDP: how ranks stay in step. A sharded module all-gathers its parameters in every forward (and
again in the backward), so every rank must call the same modules the same number of times in every
micro-batch, whatever its rows. The anchor pass runs on every rank's micro-batch anyway. The view
passes are data-dependent (the gate, the selection, which rows have images), so before each one the
ranks agree on it with one small all-reduce (the largest row count over processes, inside
`MicroBatch.view_pass`, through which each perception term runs its passes): when no rank needs
the pass, nobody runs it; when another rank needs it and this one has no row for it, this one
scores one stand-in row of its micro-batch and the term adds its result times 0 to the loss, so
the forward and the backward issue the same collectives and the update does not change. The
passes run before a mini-batch (`MicroBatch.stored_passes`) go on, a chunk of rows at a time, until
no process has rows left, a process out of rows scoring its stand-in. A pass
without images on a rank whose peers have images runs the vision tower on a blank image
(cppo.response_stats, `run_vision`), for the same reason. Without FSDP no pass waits for another
process.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cppo.batching import trim_padding
from cppo.precision import autocast, resolve_dtype
from cppo.response_stats import backbone_and_head, response_stats
from cppo.rl.fsdp import compute_device, is_sharded
from cppo.rl.perception import PerceptionTerm
from cppo.rl.ranks import collective_device
from cppo.rl.rollout import Rollouts, select_rows


@dataclass(frozen=True)
class Passes:
    """How the update's passes run. The trainer uses the defaults; a benchmark hands another."""

    # (model, inputs, ids, mask, temperature, chunk, entropy_grad=) -> (entropy, logp), each (n, T)
    forward: Callable = response_stats
    trim: bool = True  # each pass on its own rows' tokens; False: the step's L + T columns (padded)
    term: PerceptionTerm | None = None  # the perception term; None: the one `cfg.algo` names


def _entropy_and_logp(
    model,
    ro: Rollouts,
    rows: list[int],
    cfg,
    view: str | tuple | None = None,
    entropy_grad: bool = False,
    passes: Passes = Passes(),
    lengths: torch.Tensor | None = None,
):
    """(entropy (n, T), logprob (n, T)) of `rows` under `view` (None = the original images); for a
    tuple of views, one such pair per view, from ONE forward of the rows under each view.

    With `passes.trim` the pass runs on its rows' own tokens only (`cppo.batching.trim_padding`: no
    column that is padding in every one of its rows) and its results are padded back to the step's
    T with zeros, which they are outside the response mask anyway. `lengths` (n,): each row is
    scored on its first `lengths[i]` response tokens only (0 after them)."""
    if isinstance(view, tuple):
        k = len(view)
        each = None if lengths is None else lengths.repeat(k)
        entropy, logp = _one_pass(model, ro, rows * k, cfg, view, entropy_grad, passes, each)
        return tuple(zip(entropy.chunk(k), logp.chunk(k)))
    return _one_pass(model, ro, rows, cfg, view, entropy_grad, passes, lengths)


def _one_pass(model, ro, rows, cfg, view, entropy_grad, passes, lengths):
    """`_entropy_and_logp` of one forward; `view` a tuple: `rows` are len(view) copies of the same
    rows, the i-th copy under the i-th view."""
    if isinstance(view, tuple):
        n = len(rows) // len(view)
        parts = [select_rows(ro, rows[:n], _image_token_id(model), v) for v in view]
        inputs = concat_inputs(parts)
        keys = [k for v in view for k in _image_keys(ro, rows[:n], v)]
    else:
        inputs = select_rows(ro, rows, _image_token_id(model), view)
        keys = _image_keys(ro, rows, view)
    tower = _frozen_tower(model)
    if tower is not None and inputs.get("pixel_values") is not None:  # each image encoded once a step
        inputs["image_keys"] = [(id(tower), *k) for k in keys]
        inputs["image_cache"] = ro.image_features
    ids, mask = ro.response_ids[rows], ro.response_mask[rows]
    T = ids.shape[1]
    if lengths is not None:
        mask = mask & (torch.arange(T) < lengths.cpu().unsqueeze(1))  # (n, T)
    if passes.trim:
        inputs, t = trim_padding(inputs, mask)
        ids, mask = ids[:, :t], mask[:, :t]
    device = compute_device(model)  # not its parameters' device when FSDP keeps them on the CPU
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    with autocast(device, resolve_dtype(cfg.dtype, device)):
        entropy, logp = passes.forward(
            model,
            inputs,
            ids.to(device),
            mask.to(device),
            cfg.temperature,
            cfg.logits_chunk_size,
            entropy_grad=entropy_grad,
        )
    if entropy.shape[1] < T:
        entropy, logp = (F.pad(x, (0, T - x.shape[1])) for x in (entropy, logp))
    return entropy, logp


def _image_keys(ro: Rollouts, rows: list[int], view: str | None) -> list[tuple]:
    """(view, prompt, image, the pixels' tensor) of each image of `rows`, in select_rows' order; the
    tensor's identity keeps a copy of `ro` with other pixels (and the same cache) apart."""
    G = ro.group_size
    pixels = ro.pixel_values if view is None else ro.views.get(view)
    return [(view, r // G, k, id(pixels)) for r in rows for k in range(ro.images_per_prompt[r // G])]


def _frozen_tower(model):
    """The vision tower of an unsharded model when none of its parameters trains, else None: its
    features then stay the same all step, and each image is encoded once (Rollouts.image_features);
    a trained or sharded tower runs in every pass."""
    if is_sharded(model) or not hasattr(getattr(model, "module", model), "lm_head"):
        return None  # sharded, or not a Qwen2.5-VL (a test's stand-in model)
    backbone, _ = backbone_and_head(model)
    tower = getattr(backbone, "visual", None)
    if tower is None or any(p.requires_grad for p in tower.parameters()):
        return None
    return tower


def concat_inputs(parts: list[dict]) -> dict:
    """The batches `parts` (select_rows outputs of the same prompt length) one after the other."""
    out = dict(parts[0])
    for key, value in parts[0].items():
        if torch.is_tensor(value) and value.dim() > 0:
            out[key] = torch.cat([p[key] for p in parts])
    return out


def _any_process_has_rows(model, n: int) -> bool:
    """Whether any process has a row for a pass this one has `n` rows for: `n > 0` unsharded; under
    FSDP one all-reduce of the largest count (module docstring)."""
    if not is_sharded(model):
        return n > 0
    most = torch.tensor([n], device=collective_device())
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most) > 0


def _image_token_id(model) -> int:
    inner = getattr(model, "module", model)
    return inner.config.image_token_id


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch and its anchor pass, as a perception term (cppo.rl.perception) sees it; or a
    whole mini-batch before its micro-batches (no anchor pass), for `PerceptionTerm.prepare`."""

    model: Any
    ro: Rollouts
    rows: list[int]  # n rows of the step's rollouts
    cfg: Any
    timer: Any  # cppo.rl.update.Timer
    entropy: torch.Tensor | None  # (n, T) H(I) of the anchor pass (detached unless the term asked)
    logp: torch.Tensor | None  # (n, T) log-probs under I, with grad
    passes: Passes = Passes()
    # view -> (entropy (N, T), logp (N, T), stored (N,) bool) of the step's rows, from passes without
    # gradient run before the mini-batch (`stored_passes`): `view_pass(grad=False)` reads them
    stored: dict = field(default_factory=dict)

    def view_pass(
        self,
        rows: list[int],
        view: str | tuple[str, ...],
        entropy_grad: bool = False,
        grad: bool = True,
        lengths: torch.Tensor | None = None,
    ):
        """(entropy, logprob), each (len(rows), T), of the micro-batch's rows `rows` (indices into
        `self.rows`) under `view`: the `score_view` of cppo.loss.cpl_step (`grad`: with a gradient;
        `lengths`: each row's response tokens that matter, the pass stops after them); a tuple of
        views gives one such pair per view from one forward. None when no process has a row for
        this pass; `(None, logprob)` (per view) of one stand-in row when only other processes have
        (the caller adds it times 0: module docstring, FSDP)."""
        if not _any_process_has_rows(self.model, len(rows)):
            return None
        if not grad and view in self.stored:  # no forward: every process reads its stored pass
            return self._stored(rows, view)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if not rows:  # a text-only micro-batch has no views: its stand-in runs on the original image
                many = isinstance(view, tuple)
                stand_in = tuple(v if v in self.ro.views else None for v in view) if many else (
                    view if view in self.ro.views else None
                )
                out = self._pass(self.rows[:1], stand_in, entropy_grad)
                return tuple((None, o[1]) for o in out) if many else (None, out[1])
            with self.timer("perception"):
                return self._pass([self.rows[i] for i in rows], view, entropy_grad, lengths)

    def stored_passes(self, rows: list[int], view: str, chunk: int) -> dict:
        """{view: (entropy (N, T), logp (N, T), stored (N,))}: the pass of `view` without gradient on
        `rows` (indices into `self.rows`), `chunk` rows a forward, for `MicroBatch.stored`. The
        parameters do not change within a mini-batch, so these are the values each micro-batch's own
        pass would give, in fewer and larger forwards. Under FSDP every process runs forwards until
        none has rows left (a process out of rows runs `view_pass`'s stand-in)."""
        N, T = self.ro.response_ids.shape
        entropy, logp = torch.zeros(N, T), torch.zeros(N, T)
        have = torch.zeros(N, dtype=torch.bool)
        for start in itertools.count(0, chunk):
            part = rows[start : start + chunk]
            out = self.view_pass(part, view, grad=False)
            if out is None:  # no process has rows left
                break
            if part:
                step_rows = [self.rows[i] for i in part]
                entropy[step_rows], logp[step_rows] = out[0].float().cpu(), out[1].float().cpu()
                have[step_rows] = True
        return {view: (entropy, logp, have)}

    def _stored(self, rows: list[int], view: str):
        """`view_pass`'s result for `rows` from `self.stored` ((None, a zero) for no rows: a stand-in)."""
        entropy, logp, have = self.stored[view]
        device = self.logp.device if self.logp is not None else compute_device(self.model)
        if not rows:
            return None, torch.zeros(1, device=device)
        step_rows = [self.rows[i] for i in rows]
        if not bool(have[step_rows].all()):
            raise RuntimeError(f"the stored {view} pass has no values for some of rows {step_rows}")
        return entropy[step_rows].to(device), logp[step_rows].to(device)

    def _pass(self, step_rows: list[int], view: str | None, entropy_grad: bool, lengths=None):
        model, ro, cfg = self.model, self.ro, self.cfg
        return _entropy_and_logp(model, ro, step_rows, cfg, view, entropy_grad, self.passes, lengths)
