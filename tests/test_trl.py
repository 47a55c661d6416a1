"""cppo.integrations.trl: CPPOTrainer = TRL's GRPOTrainer + lambda·CPL, on the demo model, on CPU.

Tiny settings (4 prompts x 2 rollouts, 16 new tokens) so the file runs in seconds; the data are
shapes items in an in-memory `datasets.Dataset`, the reward is defined here, nothing is downloaded.
"""

import functools
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from cppo.integrations.trl import CPPOConfig, CPPOTrainer, check_trl_internals  # noqa: E402
from cppo.loss import contrastive_perception_loss, select_perception_tokens  # noqa: E402
from cppo.models import ImageOnlyQwen2_5_VLProcessor, demo_model_path  # noqa: E402
from cppo.perturb import get_preset  # noqa: E402
from cppo.prompt import build_messages  # noqa: E402
from cppo.toy.shapes import split_items  # noqa: E402
from tests.helpers import repo_pythonpath

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(
    use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1, max_steps=2,
    per_device_train_batch_size=8, num_generations=2, max_completion_length=16,
    gradient_checkpointing=False, learning_rate=1e-4, temperature=2.0, seed=0,
)


def reward(completions, answer, **kwargs):
    """1 for the answer in the text, plus a little for length: groups rarely tie."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(a in t) + 0.1 * min(len(t), 40) / 40 for t, a in zip(texts, answer)]


@pytest.fixture(scope="module")
def dataset():
    items = split_items("train", 4)
    rows = [{"prompt": build_messages(it.question), "image": it.image, "answer": it.answer} for it in items]
    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def processor():
    return ImageOnlyQwen2_5_VLProcessor.from_pretrained(demo_model_path(), padding_side="left")


def make(cls, dataset, processor, tmp_path, **overrides):
    config_cls = CPPOConfig if cls is not GRPOTrainer else GRPOConfig
    args = config_cls(output_dir=str(tmp_path), **{**TINY, **overrides})
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(demo_model_path(), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                   processing_class=processor)


def _scores(model, inputs, rows, pixel_values, temperature):
    """(logp, entropy) (n, T) of `rows` from the model's full logits, independently of TRL's fused head."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)[rows]
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)[rows]
    grids = torch.split(inputs["image_grid_thw"], inputs["num_images"])
    grid = torch.cat([grids[r] for r in rows])
    mm = inputs["mm_token_type_ids"][rows]
    logits = model(
        input_ids=ids, attention_mask=att, pixel_values=pixel_values, image_grid_thw=grid,
        mm_token_type_ids=mm,
    ).logits
    T = inputs["completion_ids"].size(1)
    logp_all = torch.log_softmax(logits[:, -T - 1 : -1].float() / temperature, -1)
    logp = logp_all.gather(-1, inputs["completion_ids"][rows].unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def reference_cpl(trainer, inputs):
    """lambda-free CPL of a batch, recomputed from plain forwards: gate, I-, selection, I+."""
    model, cfg = trainer.model, trainer.args
    mask = inputs["completion_mask"].bool()
    rows = (inputs["advantages"] > 0).nonzero().squeeze(1).tolist()
    if not rows:
        return 0.0
    grids = torch.split(inputs["image_grid_thw"], inputs["num_images"])
    sizes = [int(g.prod(-1).sum()) for g in grids]
    anchor_pv = torch.split(inputs["pixel_values"], sizes)
    anchor, ent = _scores(model, inputs, rows, torch.cat([anchor_pv[r] for r in rows]), cfg.temperature)
    minus, plus = (torch.cat([inputs[f"cpl_pixel_values_{v}"][r] for r in rows]) for v in ("minus", "plus"))
    neg, ent_neg = _scores(model, inputs, rows, minus, cfg.temperature)
    pos, _ = _scores(model, inputs, rows, plus, cfg.temperature)
    sel = select_perception_tokens(ent, ent_neg, mask[rows], cfg.top_percent, selector=cfg.selector)
    cpl, _ = contrastive_perception_loss(anchor, pos, neg, sel, tau=cfg.cpl_tau, response_mask=mask[rows])
    return float(cpl)


class Recording(CPPOTrainer):
    """Per loss call: CPPO's loss, TRL's GRPO loss on the same batch, the logged and a reference CPL."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs)
        with torch.no_grad():
            grpo = GRPOTrainer._compute_loss(self, model, inputs)
            ref = reference_cpl(self, inputs)
        self.records.append((float(loss.detach()), float(grpo), self._metrics["train"]["cpl/loss"][-1], ref))
        return loss


def test_signature_check_passes_and_names_the_pin_when_internals_change():
    check_trl_internals()

    class Changed(GRPOTrainer):
        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep):
            return None, None

    with pytest.raises(RuntimeError, match=re.escape("trl>=1.16,<1.17")) as err:
        check_trl_internals(Changed)
    assert "compute_entropy" in str(err.value) and "returns" in str(err.value)


def test_config_refuses_what_trl_cannot_feed(tmp_path):
    with pytest.raises(ValueError, match="cpl_gate"):
        CPPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, cpl_gate="correct")
    with pytest.raises(ValueError, match="selector"):
        CPPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, selector="kl_shift")
    with pytest.raises(TypeError, match="CPPOConfig"):
        CPPOTrainer(model=None, args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False))


def test_two_steps_loss_minus_grpo_is_lambda_cpl(dataset, processor, tmp_path):
    trainer = make(Recording, dataset, processor, tmp_path, cpl_lambda=0.5, cpl_rows=1.0)  # full term
    trainer.records = []
    before = {k: v.clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    assert len(trainer.records) == 2
    loss, grpo, cpl, ref = trainer.records[0]  # step 1: the first update, on the step's rollouts
    assert cpl > 0 and ref > 0  # views, gate and selection found tokens
    assert loss - grpo == pytest.approx(0.5 * cpl, abs=1e-6)
    assert cpl == pytest.approx(ref, rel=1e-3)  # TRL's fused passes agree with plain forwards
    logged = trainer.state.log_history
    assert {"cpl/loss", "cpl/mask_frac"} <= set(logged[0]) and 0 < logged[0]["cpl/mask_frac"] <= 1
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters())


def test_every_loss_type_is_trls_loss_plus_lambda_cpl(dataset, processor, tmp_path):
    trainer = make(CPPOTrainer, dataset, processor, tmp_path, cpl_lambda=0.5, beta=0.01, cpl_rows=1.0)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    for loss_type in ("dapo", "grpo", "bnpo", "dr_grpo", "cispo", "sapo", "vespo", "luspo"):
        trainer.loss_type = loss_type
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, inputs)
            grpo = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
        cpl = trainer._metrics["train"]["cpl/loss"][-1]
        assert cpl > 0, loss_type
        assert float(loss - grpo) == pytest.approx(0.5 * cpl, abs=1e-6), loss_type


def _with_fuse(step, fused, *args, **kwargs):
    return step(*args, **{**kwargs, "fuse_views": fused})


def test_the_sampled_terms_two_views_in_one_forward_equal_two(dataset, processor, tmp_path, monkeypatch):
    """--cpl-rows 0.5: the drawn rows' I- and I+ passes as one forward (fuse_views) give the loss and
    the gradients of one forward per view, in one forward fewer."""
    import cppo.integrations.trl as integration

    trainer = make(CPPOTrainer, dataset, processor, tmp_path, cpl_lambda=0.5, cpl_rows=0.5)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    step, out, calls = integration.cpl_step, {}, []
    trainer.model.model.visual.register_forward_hook(lambda m, a, o: calls.append(1))  # once a forward
    for fused in (True, False):
        torch.manual_seed(0)  # the same rows drawn
        monkeypatch.setattr(integration, "cpl_step", functools.partial(_with_fuse, step, fused))
        trainer.model.zero_grad(set_to_none=True)
        calls.clear()
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        out[fused] = (float(loss), trainer._metrics["train"]["cpl/loss"][-1], grads, len(calls))
    assert out[True][1] > 0 and out[True][3] == out[False][3] - 1  # the term was on; one forward fewer
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
    assert out[True][1] == pytest.approx(out[False][1], rel=1e-5)
    for name, g in out[True][2].items():
        torch.testing.assert_close(g, out[False][2][name], atol=1e-6, rtol=1e-5, msg=name)


def test_lambda_zero_is_plain_grpo(dataset, processor, tmp_path):
    runs = []
    for cls, kw in ((GRPOTrainer, {}), (CPPOTrainer, {"cpl_lambda": 0.0})):
        trainer = make(cls, dataset, processor, tmp_path / cls.__name__, **kw)
        trainer.train()
        runs.append(trainer)
    grpo, cppo = runs
    assert [h.get("loss") for h in grpo.state.log_history] == [h.get("loss") for h in cppo.state.log_history]
    assert "cpl/loss" not in cppo.state.log_history[0]
    for (name, a), (_, b) in zip(grpo.model.named_parameters(), cppo.model.named_parameters()):
        assert torch.equal(a, b), name


def test_views_survive_prepare_inputs_per_row(dataset, processor, tmp_path):
    # 2 updates per generation: TRL shuffles the 8 rows and cuts them into two batches of 4
    trainer = make(CPPOTrainer, dataset, processor, tmp_path, per_device_train_batch_size=4,
                   steps_per_generation=2, cpl_lambda=0.1, view_seed=7)
    trainer.model.train()
    generation_batch = next(iter(trainer.get_train_dataloader()))  # prompts in order, each twice
    first = trainer._prepare_inputs(generation_batch)
    chunks = trainer._buffered_inputs
    assert first is chunks[0] and len(chunks) == 2
    # what every row of prompt p must carry: its image's views under seed (view_seed, step 0, draw 0, p, 0)
    preset, image_proc = get_preset("paper"), processor.image_processor
    expected = {}
    for p in range(len(generation_batch) // 2):
        image = generation_batch[2 * p]["image"]
        plus, minus, _ = preset.draw(image, np.random.SeedSequence([7, 0, 0, p, 0]))
        original = image_proc(images=[image], return_tensors="pt")["pixel_values"]
        expected[p] = [image_proc(images=[v], return_tensors="pt")["pixel_values"] for v in (plus, minus)]
        expected[p].insert(0, original)
    seen = []
    for chunk in chunks:
        sizes = chunk["image_grid_thw"].prod(-1).tolist()
        anchors = torch.split(chunk["pixel_values"], sizes)
        assert len(chunk["cpl_pixel_values_plus"]) == len(chunk["cpl_pixel_values_minus"]) == 4
        for r in range(4):
            p = next(p for p, e in expected.items() if torch.equal(anchors[r], e[0]))  # the row's prompt
            assert torch.equal(chunk["cpl_pixel_values_plus"][r], expected[p][1])
            assert torch.equal(chunk["cpl_pixel_values_minus"][r], expected[p][2])
            assert not torch.equal(chunk["cpl_pixel_values_minus"][r], anchors[r])
            seen.append(p)
    assert sorted(seen) == [0, 0, 1, 1, 2, 2, 3, 3]  # every row once, its group's views


def test_docs_example_runs_as_written(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "trl.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = next(b for b in blocks if "trainer.train()" in b)
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(example, "docs/trl.md", "exec"), {"__name__": "__main__"})
    final = tmp_path / "cppo-demo" / "final"
    assert (final / "config.json").is_file()  # the model, and the processor AutoProcessor can load
    assert '"processor_class": "Qwen2_5_VLProcessor"' in (final / "processor_config.json").read_text()


def test_bench_trl_runs_on_a_tiny_setting(tmp_path, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_trl", ROOT / "bench" / "bench_trl.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.chdir(tmp_path)
    out = bench.main([
        "--prompts", "2", "--group", "2", "--max-new-tokens", "4", "--micro", "2", "--steps", "2",
        "--repeats", "1", "--in-process", "--json", str(tmp_path / "bench.json"),
    ])  # fmt: skip
    assert set(out["summary"]) == set(bench.VARIANTS)
    assert all(s["s_per_step"] > 0 for s in out["summary"].values())
    printed = capsys.readouterr().out
    assert "| TRL + CPPOTrainer |" in printed and "Not made equal" in printed


@pytest.mark.slow
def test_two_processes_draw_the_same_views_for_a_group(tmp_path):
    """torchrun, 2 CPU processes: a group split over both gets the same views on each; training runs."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": repo_pythonpath(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "tests" / "workers" / "trl_two_processes.py"), str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["steps"] == 2 and len(r["cpl"]) == 2 for r in ranks)
    view_of = {}
    for r in ranks:
        for step, image, view in r["rows"]:
            assert view_of.setdefault((step, image), view) == view  # one view per prompt, on every process
    on = [{(s, i) for s, i, _ in r["rows"]} for r in ranks]
    assert on[0] & on[1]  # 3 rows per process, groups of 2: one group spans both processes
