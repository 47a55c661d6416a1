"""The perception-token detector's model passes: which response tokens lose certainty when the image
loses information.

    from cppo.detect import Example, PerceptionDetector
    detector = PerceptionDetector.from_pretrained(demo_model_path(), preset="paper", draws=4)
    [det] = detector.detect([Example(images=[img], prompt="What color is the square?")])
    det.selected, det.shift, det.to_dict()

For every response token it computes, exactly as docs/method.md §2, the entropy under the original
image H(I), the entropy under an information-removing view H(I-), the shift dH = H(I-) - H(I), the
selector's score and the selection mask (``cppo.loss.select``: one copy of the rule, shared with
the trainer). The response is teacher-forced under every view (docs/method.md §5.4); one backbone pass
per view, and only response positions go through the output head, in chunks of positions
(``cppo.response_stats.response_hidden`` + ``chunked_entropy_and_logprob``), so the (N, T, V) logits of a
long response never exist at once.

Letters: N examples in a batch, K draws, T response tokens, D hidden size, V vocabulary.

What goes in and comes out (``Example``, ``Detection``, the errors) is ``cppo.detect.detection``.

Where this departs from the paper's code, and why:

- ``draws = K > 1`` draws the removing view K times per example (independent parameters each time)
  and uses the MEAN over draws of H(I-) (and of the KL) in the selector, so the shift is the mean
  shift; its spread (standard deviation over draws, 0 for K = 1) is reported per token. The paper
  draws one view per prompt (K = 1, the default, which reproduces it exactly); the mean makes the
  probe depend less on where one random occluder happened to fall.
- The removing view is drawn per (seed, example index, draw, image) from a ``numpy`` SeedSequence,
  so an example's views do not depend on which batch it lands in. The preset draws it
  (``Preset.draw_view``: one of its removing entries chosen uniformly, then its parameters);
  ``perturbation=`` narrows the preset to that one entry.
- Several images in one example: each image gets its own draw (docs/method.md §5.9). Text-only
  examples have nothing to remove and are refused.
- A missing response is generated from the prompt and the ORIGINAL image: sampled at
  ``temperature`` (the rollout temperature, as the trainer does) with a seed derived from
  ``seed`` and the batch's first example index, or greedily with ``greedy=True``. A response given
  as text is tokenised without special tokens and without an end token appended: it is scored
  exactly as given.
- All logits are divided by ``temperature`` before the entropy (docs/method.md §5.6).
- The KL between the two views is computed only when the selector needs it (``kl_shift``) or when
  ``compute_kl=True`` (one more pass of the response positions through the output head per draw).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from cppo.batching import take_rows
from cppo.detect.detection import DetectError, Detection, Example, ResponseTooLongError, score_and_select
from cppo.loss.entropy import chunked_entropy_and_logprob, chunked_kl
from cppo.loss.select import SELECTORS
from cppo.models import (
    append_responses,
    encode_images,
    encode_prompts,
    generate_responses,
    load_model_and_processor,
)
from cppo.perturb import Preset, get_perturbation, get_preset, list_perturbations
from cppo.precision import resolve_device, resolve_dtype
from cppo.response_stats import backbone_and_head, response_hidden


def max_positions(model) -> int:
    """The model's position limit (text ``max_position_embeddings``)."""
    cfg = getattr(model.config, "text_config", model.config)
    return int(cfg.max_position_embeddings)


class PerceptionDetector:
    """Runs the model passes of docs/method.md §2 over batches of examples.

    Args:
        model, processor: a Qwen2.5-VL model (eval mode, on its device) and its processor.
        preset: a preset name (or ``Preset``) whose removing entries give the I- view.
        perturbation: one removing perturbation name; overrides the preset's choice.
        selector: ``relative`` (paper), ``raw``, ``kl_shift`` or ``entropy`` (``cppo.detect.SELECTORS``).
        top_percent: rho, the fraction of each response's candidates to select.
        draws: K views per example; the selection uses the mean over draws.
        temperature: divides every logit; also the sampling temperature of generated responses.
        max_new_tokens: length cap of generated responses.
        greedy: generate greedily instead of sampling.
        batch_size: examples per model pass.
        chunk_size: response positions per output-head chunk (peak extra memory ~ chunk * V * 4 B).
        seed: seeds every view and every generated response.
        compute_kl: also report the per-token KL between the views (always on for ``kl_shift``).
    """

    def __init__(
        self,
        model,
        processor,
        *,
        preset="paper",
        perturbation: str | None = None,
        selector: str = "relative",
        top_percent: float = 0.5,
        draws: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int = 128,
        greedy: bool = False,
        batch_size: int = 8,
        chunk_size: int = 256,
        seed: int = 0,
        compute_kl: bool = False,
    ):

        if selector not in SELECTORS.names():
            raise DetectError(f"unknown selector {selector!r}; valid: {', '.join(SELECTORS.names())}")
        if not 0.0 < top_percent <= 1.0:
            raise DetectError(f"top_percent must be in (0, 1], got {top_percent}")
        if draws < 1:
            raise DetectError(f"draws must be >= 1, got {draws}")
        if not temperature > 0:
            raise DetectError(f"temperature must be > 0, got {temperature}")
        if batch_size < 1 or chunk_size < 1 or max_new_tokens < 1:
            raise DetectError("batch_size, chunk_size and max_new_tokens must be >= 1")
        self.preset = preset if isinstance(preset, Preset) else get_preset(preset)
        if perturbation is not None:
            entry = get_perturbation(perturbation)
            if entry.kind != "removing":
                raise DetectError(
                    f"perturbation {perturbation!r} is {entry.kind}; the detector needs a removing view: "
                    f"{', '.join(list_perturbations(kind='removing'))}"
                )
            self.preset = dataclasses.replace(self.preset, removing=(entry,))  # the forced entry only
        self.model, self.processor = model, processor
        self.selector, self.top_percent, self.draws = selector, top_percent, draws
        self.temperature, self.max_new_tokens, self.greedy = temperature, max_new_tokens, greedy
        self.batch_size, self.chunk_size, self.seed = batch_size, chunk_size, seed
        self.compute_kl = compute_kl or selector == "kl_shift"
        self.limit = max_positions(model)
        tok = processor.tokenizer
        self.pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
        self.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])

    @classmethod
    def from_pretrained(cls, path_or_id, device: str = "auto", dtype="auto", **kwargs) -> PerceptionDetector:
        """Load a checkpoint (a folder or a cached hub id): CUDA bf16 when available, else CPU float32."""

        dev = resolve_device(device)
        try:
            dtype = resolve_dtype(dtype, dev)
        except ValueError as e:  # an unknown name: the message lists the valid ones
            raise DetectError(str(e)) from None
        model, processor = load_model_and_processor(path_or_id, device=dev, dtype=dtype)
        return cls(model, processor, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict:
        """The settings, as written at the top of ``tokens.json``."""
        return {
            "preset": self.preset.name,
            "removing": [e.name for e in self.preset.removing],
            "selector": self.selector,
            "top_percent": self.top_percent,
            "draws": self.draws,
            "temperature": self.temperature,
            "max_new_tokens": self.max_new_tokens,
            "greedy": self.greedy,
            "seed": self.seed,
            "device": str(self.device),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
        }

    # ------------------------------------------------------------------ inputs

    def response_ids(self, example: Example, index: int) -> list[int] | None:
        """The response as token ids (None: to be generated); checks ids and length alone."""
        resp = example.response
        if resp is None:
            return None
        if isinstance(resp, str):
            if not resp:
                raise DetectError(f"example {index} ({example.name or 'unnamed'}): the response is empty")
            ids = self.processor.tokenizer(resp, add_special_tokens=False)["input_ids"]
        else:
            ids = [int(i) for i in resp]
            if not ids:
                raise DetectError(f"example {index} ({example.name or 'unnamed'}): the response is empty")
            if bad := [i for i in ids if not 0 <= i < self.vocab_size]:
                raise DetectError(
                    f"example {index}: response token ids {bad[:5]} are outside the vocabulary "
                    f"[0, {self.vocab_size})"
                )
        if len(ids) >= self.limit:
            raise ResponseTooLongError(
                f"example {index} ({example.name or 'unnamed'}): the response has {len(ids)} tokens, "
                f"more than the model's limit of {self.limit} positions"
            )
        return ids

    def check(self, example: Example, index: int) -> None:
        """Refuse, with the reason, an example the detector cannot score (before any model pass)."""
        label = f"example {index} ({example.name or 'unnamed'})"
        if not example.prompt or not example.prompt.strip():
            raise DetectError(f"{label}: the prompt is empty")
        if not example.images:
            raise DetectError(f"{label}: no image; the detector removes image information, so it needs one")
        for img in example.images:
            if not isinstance(img, Image.Image):
                raise DetectError(f"{label}: images must be PIL images, got {type(img).__name__}")
        self.response_ids(example, index)

    def draw_views(self, example: Example, index: int) -> tuple[list[list[dict]], list[list[Image.Image]]]:
        """(records [K][images], views [K][images]) of the removing perturbation for one example."""
        records, views = [], []
        for k in range(self.draws):
            recs, imgs = [], []
            for j, image in enumerate(example.images):
                rng = np.random.default_rng(np.random.SeedSequence([self.seed, index, k, j]))
                view, record = self.preset.draw_view(image, rng, "removing")
                imgs.append(view)
                recs.append(record)
            records.append(recs)
            views.append(imgs)
        return records, views

    # ------------------------------------------------------------------ passes

    def detect(
        self, examples: Sequence[Example], progress: bool | None = None, start_index: int = 0
    ) -> list[Detection]:
        """One ``Detection`` per example, in order. ``progress``: a tqdm bar (None: only on a terminal).

        Every example is checked before the first model pass; a prompt + response longer than the
        model's limit raises ``ResponseTooLongError`` when its batch is encoded.
        """
        from tqdm.auto import tqdm

        for i, ex in enumerate(examples):
            self.check(ex, start_index + i)
        out: list[Detection] = []
        disable = None if progress is None else not progress
        with tqdm(total=len(examples), unit="example", desc="cppo-detect", disable=disable) as bar:
            for s in range(0, len(examples), self.batch_size):
                chunk = list(examples[s : s + self.batch_size])
                out += self._detect_batch(chunk, start_index + s)
                bar.update(len(chunk))
        return out

    def _generate(
        self, enc: dict, rows: list[int], first_index: int
    ) -> dict[int, tuple[list[int], list[bool]]]:

        sub = take_rows(enc, rows, self.image_token_id)
        room = self.limit - sub["input_ids"].shape[1]
        if room < 1:
            raise ResponseTooLongError(
                f"examples from {first_index}: the prompt fills the model's limit of {self.limit} positions"
            )
        ids, mask = generate_responses(
            self.model,
            self.processor,
            sub,
            max_new_tokens=min(self.max_new_tokens, room),
            temperature=self.temperature,
            do_sample=not self.greedy,
            generator_seed=self.seed * 1_000_003 + first_index,
        )
        out = {}
        for r, row_ids, row_mask in zip(rows, ids.tolist(), mask.tolist()):
            last = max((t for t, m in enumerate(row_mask) if m), default=-1)
            out[r] = (row_ids[: last + 1], row_mask[: last + 1])
        return out

    @torch.no_grad()
    def _detect_batch(self, chunk: list[Example], first_index: int) -> list[Detection]:

        dev = self.device
        enc = encode_prompts(self.processor, [ex.prompt for ex in chunk], [ex.images for ex in chunk])
        enc = {k: v.to(dev) for k, v in enc.items()}
        N, L = enc["input_ids"].shape
        prompt_len = enc["attention_mask"].sum(1).tolist()  # (N,) tokens of each prompt, padding excluded
        given = [self.response_ids(ex, first_index + i) for i, ex in enumerate(chunk)]
        resp: dict[int, tuple[list[int], list[bool]]] = {
            i: (ids, [True] * len(ids)) for i, ids in enumerate(given) if ids is not None
        }
        for i, (ids, _) in resp.items():
            if prompt_len[i] + len(ids) > self.limit:
                raise ResponseTooLongError(
                    f"example {first_index + i} ({chunk[i].name or 'unnamed'}): prompt ({prompt_len[i]}) + "
                    f"response ({len(ids)}) tokens exceed the model's limit of {self.limit} positions"
                )
        if need := [i for i, ids in enumerate(given) if ids is None]:
            resp.update(self._generate(enc, need, first_index))

        T = max(1, max(len(resp[i][0]) for i in range(N)))
        response_ids = torch.full((N, T), self.pad_id, dtype=torch.long)  # (N, T)
        response_mask = torch.zeros(N, T, dtype=torch.bool)  # (N, T)
        for i in range(N):
            ids, m = resp[i]
            response_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            response_mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
        response_ids, response_mask = response_ids.to(dev), response_mask.to(dev)
        inputs = append_responses(enc, response_ids, response_mask)
        _, head = backbone_and_head(self.model)

        def entropy_of(hidden):  # (N, T, D) -> (N, T) float32
            ent, _ = chunked_entropy_and_logprob(
                hidden, head, response_ids, self.temperature, self.chunk_size, mask=response_mask
            )
            return ent

        hidden = response_hidden(self.model, inputs)  # (N, T, D) original image
        entropy = entropy_of(hidden)  # (N, T)

        drawn = [self.draw_views(ex, first_index + i) for i, ex in enumerate(chunk)]
        perturbed, kls = [], []
        for k in range(self.draws):
            pix, grid = encode_images(self.processor, [drawn[i][1][k] for i in range(N)])
            if not torch.equal(grid.to(dev), enc["image_grid_thw"]):
                raise DetectError("a removing view changed an image's size; views must keep width and height")
            hidden_minus = response_hidden(self.model, inputs, pix.to(dev))  # (N, T, D)
            perturbed.append(entropy_of(hidden_minus))  # (N, T)
            if self.compute_kl:
                kls.append(
                    chunked_kl(
                        hidden, hidden_minus, self.temperature, self.chunk_size, head=head, mask=response_mask
                    )
                )  # (N, T)
            del hidden_minus
        per_draw = torch.stack(perturbed)  # (K, N, T)
        draw_shifts = (per_draw - entropy[None]) * response_mask[None]  # (K, N, T)
        perturbed_mean = per_draw.mean(0)  # (N, T)
        shift = perturbed_mean - entropy  # (N, T) = mean over draws of dH
        shift_std = draw_shifts.std(0) if self.draws > 1 else torch.zeros_like(shift)  # (N, T)
        kl = torch.stack(kls).mean(0) if kls else None  # (N, T)
        score, selected = score_and_select(
            entropy, perturbed_mean, response_mask, kl, self.selector, self.top_percent
        )
        score = torch.where(response_mask, score, torch.zeros_like(score))  # (N, T)

        tok = self.processor.tokenizer
        out = []
        for i, ex in enumerate(chunk):
            n = len(resp[i][0])
            ids = response_ids[i, :n].tolist()

            def cpu(x, i=i, n=n):
                return x[i, :n].detach().float().cpu()

            out.append(
                Detection(
                    index=first_index + i,
                    example=ex,
                    token_ids=ids,
                    token_texts=[tok.decode([t], skip_special_tokens=False) for t in ids],
                    response_mask=response_mask[i, :n].cpu(),
                    generated=ex.response is None,
                    entropy=cpu(entropy),
                    perturbed_entropy=cpu(perturbed_mean),
                    shift=cpu(shift),
                    shift_std=cpu(shift_std),
                    draw_shifts=draw_shifts[:, i, :n].float().cpu(),
                    kl=None if kl is None else cpu(kl),
                    score=cpu(score),
                    selected=response_mask[i, :n].cpu() & selected[i, :n].cpu(),
                    selector=self.selector,
                    top_percent=self.top_percent,
                    views=drawn[i][0],
                    perturbed_images=drawn[i][1],
                )
            )
        return out


def detect(
    model, processor, examples: Sequence[Example], progress: bool | None = None, **kwargs
) -> list[Detection]:
    """Shorthand: ``PerceptionDetector(model, processor, **kwargs).detect(examples)``."""
    return PerceptionDetector(model, processor, **kwargs).detect(examples, progress=progress)
