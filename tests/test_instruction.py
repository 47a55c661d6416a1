"""The paper's instruction suffix is an option of the preprocessing, on by default (--no-instruction)."""

from cppo.models.prompt_tokens import prompt_lengths
from cppo.perturb import get_preset
from cppo.prompt import INSTRUCTION, instruction_for
from cppo.rl.flags import parse_args
from cppo.rl.rollout import prepare_prompts
from tests.helpers import shapes_items, tiny_model_and_processor


def _samples(n=2):
    from cppo.rl.data import Sample

    return [Sample(index=i, question=it.question, answer=it.answer, images=[it.image]) for i, it in
            enumerate(shapes_items(n, seed=4))]  # fmt: skip


def test_the_flag_and_its_default():
    assert parse_args([]).instruction is True
    assert parse_args(["--no-instruction"]).instruction is False
    assert instruction_for(True) == INSTRUCTION and instruction_for(False) is None


def test_prompts_carry_the_instruction_only_when_asked():
    _, processor = tiny_model_and_processor()
    samples = _samples()
    with_it = prepare_prompts(processor, samples, [1, 2], "grpo", get_preset("paper"))
    without = prepare_prompts(processor, samples, [1, 2], "grpo", get_preset("paper"), instruction=None)
    decode = processor.tokenizer.batch_decode
    assert all("MUST BE put in" in t for t in decode(with_it.batch["input_ids"]))
    assert not any("MUST BE put in" in t for t in decode(without.batch["input_ids"]))
    # the length check counts what the prompts hold, either way
    sizes = [[s.images[0].size] for s in samples]
    questions = [s.question for s in samples]
    for prompts, instruction in ((with_it, INSTRUCTION), (without, None)):
        real = prompts.batch["attention_mask"].sum(1).tolist()
        assert prompt_lengths(processor, questions, sizes, instruction) == real
