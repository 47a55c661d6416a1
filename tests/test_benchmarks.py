"""cppo.benchmarks: the VLMEvalKit TSV reader, the matching rules, each benchmark's metric on a constructed
case (the score worked out by hand beside it), the runs' mean and std, the judge against a local stub."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from cppo.benchmarks import ChatJudge, JudgeError, TsvError, get_benchmark, paper_table, read_tsv, score_runs
from cppo.benchmarks.matching import boxed_prediction, chosen_letters, infer_option
from cppo.benchmarks.protocol import resolve_files, run_summary
from cppo.benchmarks.suite import PAPER_BENCHMARKS
from tests.bench_tsv import png_b64, write_tsv

# ---------------------------------------------------------------- the reader


def test_reader_decodes_inline_pictures_references_paths_and_lists(tmp_path):
    (tmp_path / "pics").mkdir()
    from PIL import Image

    Image.new("RGB", (20, 10), (0, 0, 255)).save(tmp_path / "pics" / "blue.png")
    big = png_b64((40, 30))
    path = write_tsv(
        tmp_path / "WeMath.tsv",
        [
            {"index": 1, "image": big, "question": "q1", "answer": "A"},
            {"index": 2, "image": "1", "question": "q2", "answer": "B"},  # another row's picture
            {"index": 3, "image": str([big, png_b64((8, 8))]), "question": "q3", "answer": "C"},
            {"index": 4, "image_path": "pics/blue.png", "question": "q4\twith a tab", "answer": "D"},
        ],
    )
    rows = read_tsv(path)
    assert [r.index for r in rows] == ["1", "2", "3", "4"]
    assert rows[0].images[0].size == (40, 30) and rows[1].images[0].size == (40, 30)
    assert [im.size for im in rows[2].images] == [(40, 30), (8, 8)]
    assert rows[3].images[0].getpixel((0, 0)) == (0, 0, 255)
    assert rows[3].get("question") == "q4\twith a tab"  # a quoted tab stays in its cell
    assert "image" not in rows[0].fields and rows[0].where.endswith("WeMath.tsv:2")


@pytest.mark.parametrize(
    "rows, needle",
    [
        ([{"index": 1, "image": png_b64(), "question": "q"}], ":1: no column 'answer'"),
        (
            [{"index": 1, "image": "not-base64-at-all!" * 9, "answer": "A"}],
            ":2: column 'image': the image cell",
        ),
        ([{"index": 1, "answer": "A"}, {"index": 1, "answer": "B"}], ":3: index 1 repeats line 2"),
        ([{"index": 1, "answer": ""}], ":2: column 'answer' is empty"),
        ([{"index": 1, "image": "7", "answer": "A"}], "neither a picture nor the index of a row with one"),
        ([{"index": 1, "image_path": "missing.png", "answer": "A"}], "image_path"),
    ],
)
def test_reader_errors_name_the_file_line_and_column(tmp_path, rows, needle):
    path = write_tsv(tmp_path / "b.tsv", rows)
    with pytest.raises(TsvError) as e:
        read_tsv(path)
    message = str(e.value)
    assert needle in message and str(path) in message and "\n" not in message


def test_reader_refuses_a_missing_file_and_a_file_without_pictures(tmp_path):
    with pytest.raises(TsvError, match="no such file"):
        read_tsv(tmp_path / "nope.tsv")
    path = tmp_path / "nopic.tsv"
    path.write_text("index\tanswer\n1\tA\n")
    with pytest.raises(TsvError, match="neither an 'image' nor an 'image_path' column"):
        read_tsv(path)


# ---------------------------------------------------------------- the matching rules


@pytest.mark.parametrize(
    "response, prediction",
    [
        ("<think>x</think> so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{B}", "B"),  # the last box
        ("\\boxed{12", "12"),  # never closed: the rest of the response
        ("no box } here", "no box "),  # no box: cut at the first unmatched brace, as the official code
        ("no box at all", "no box at all"),
        ("ends with \\boxed{", "ends with \\boxed{"),
    ],
)
def test_boxed_prediction(response, prediction):
    assert boxed_prediction(response) == prediction


def test_infer_option_letters_then_option_text():
    options = {"A": "3", "B": "teddy bear", "C": "cat"}
    assert infer_option("B", options) == "B"
    assert infer_option("(C) cat", options) == "C"
    assert infer_option("A or B", options) is None  # two letters: none
    assert infer_option("a cute teddy bear", options) == "B"  # the one option text it contains
    assert infer_option("none fits, Z", options) == "Z"
    assert (
        infer_option("B is my guess after looking at every part of the figure", options) is None
    )  # too early


def test_chosen_letters():
    assert chosen_letters("C, A") == "ac"
    assert chosen_letters("\\text{B}") == "b"
    assert chosen_letters("A and C") == "ac"
    assert chosen_letters("AC") == "ac"
    assert chosen_letters("B. a rabbit") == "b"
    assert chosen_letters("the rabbit") is None


# ---------------------------------------------------------------- each benchmark's metric


def _rows(tmp_path, name, rows):
    return read_tsv(write_tsv(tmp_path / f"{name}.tsv", rows))


def _grade(name, rows, predictions, judge=None):
    bench = get_benchmark(name)
    verdicts = [bench.grade(r, p, judge) for r, p in zip(rows, predictions)]
    return bench.score(rows, [v.correct for v in verdicts]), [v.by for v in verdicts]


def test_logicvista_accuracy(tmp_path):
    rows = _rows(
        tmp_path,
        "LogicVista",
        [{"index": i, "question": "Which?", "answer": a} for i, a in enumerate(["A", "A, C", "B", "D"])],
    )
    # right, right (order free), wrong letter, not letters (no judge: unresolved) -> 2/4 = 50 %
    score, by = _grade("LogicVista", rows, ["A", "C, A", "(C)", "the dog"])
    assert score["score"] == 50.0 and by == ["rule", "rule", "rule", "unresolved"]


def test_mathvista_accuracy(tmp_path):
    mc = {"question": "q", "answer": "4", "choices": "['3', '4', '5']", "answer_option": "B"}
    mc.update(question_type="multi_choice", answer_type="text")
    free = {"question": "q", "question_type": "free_form"}
    rows = _rows(
        tmp_path,
        "MathVista_MINI",
        [
            {"index": 1, **mc},
            {"index": 2, **mc},
            {"index": 3, **free, "answer": "14", "answer_type": "integer"},
            {"index": 4, **free, "answer": "1.5", "answer_type": "float"},
            {"index": 5, **free, "answer": "7", "answer_type": "integer"},
            {"index": 6, **free, "answer": "red", "answer_type": "text"},
        ],
    )
    # B = B right; "5" is option C's text, C != B wrong; 14 = 14 right; 1.50 = 1.5 right;
    # "$7$" is no int (no judge: unresolved); a text answer never counts in VLMEvalKit -> 3/6 = 50 %
    score, by = _grade("MathVista_MINI", rows, ["B", "5", "14", "1.50", "$7$", "red"])
    assert score["score"] == 50.0
    assert by == ["rule", "rule", "rule", "rule", "unresolved", "rule"]


def test_wemath_strict_score(tmp_path):
    def step(i, problem, key, right):
        return {"index": i, "ID": problem, "key": key, "question": "q", "A": "x", "B": "y", "answer": "A"}, (
            "A" if right else "B"
        )

    cases = [
        *[step(i, "1", f"2steps_{k}", True) for i, k in ((1, 1), (2, 2), (3, "multi"))],  # CM
        *[
            step(i, "2", f"2steps_{k}", r) for i, k, r in ((4, 1, False), (5, 2, True), (6, "multi", True))
        ],  # RM
        # IG (ID 1 again, but a 3-step problem: its own group)
        *[step(i, "1", f"3steps_{k}", r) for i, k, r in ((7, 1, 1), (8, 2, 1), (9, 3, 1), (10, "multi", 0))],
        *[
            step(i, "4", f"2steps_{k}", r)
            for i, k, r in ((11, 1, False), (12, 2, False), (13, "multi", True))
        ],  # RM
        step(14, "9", "1step", False),  # one-step questions are not in the score
    ]
    rows = _rows(tmp_path, "WeMath", [c[0] for c in cases])
    score, _ = _grade("WeMath", rows, [c[1] for c in cases])
    # n = 4 problems, IG = 1, RM strict = 2, IK = 0: (4 - 0.5 - 2 - 0) / 4 = 37.5 %
    assert score["score"] == 37.5
    # loose: RM only when every step is wrong (problem 4): (4 - 0.5 - 1) / 4 = 62.5 %
    assert score["parts"]["score_loose"] == 62.5
    assert (score["parts"]["CM"], score["parts"]["IG"], score["parts"]["RM_strict"]) == (1, 1, 2)


def test_wemath_refuses_an_incomplete_problem(tmp_path):
    rows = _rows(
        tmp_path, "WeMath", [{"index": 1, "ID": "5", "key": "2steps_1", "question": "q", "answer": "A"}]
    )
    with pytest.raises(TsvError, match="problem ID 5 lacks 2steps_2, 2steps_multi"):
        get_benchmark("WeMath").score(rows, [True])


def test_dynamath_overall_and_worst_case(tmp_path):
    rows = _rows(
        tmp_path,
        "DynaMath",
        [
            {"index": 1, "qid": 1, "varid": 1, "question": "q", "answer": "3.142", "answer_type": "float"},
            {
                "index": 2,
                "qid": 1,
                "varid": 2,
                "question": "q",
                "answer": "B",
                "answer_type": "multiple choice",
            },
            {"index": 3, "qid": 2, "varid": 1, "question": "q", "answer": "2.0", "answer_type": "float"},
            {
                "index": 4,
                "qid": 2,
                "varid": 2,
                "question": "q",
                "answer": "y = 2x + 1",
                "answer_type": "free form",
            },
        ],
    )
    predictions = ["3.1416", '{"solution": "...", "short answer": "B"}', "2π", "2x + 1"]
    # |3.1416 - 3.142| = 0.0004 <= 0.001 right; the JSON's short answer B right; 2π = 6.28 != 2 wrong;
    # "2x + 1" is a substring of the answer, right -> Overall 3/4 = 75 %; worst case: qid 1 all right,
    # qid 2 not -> 1/2 = 50 %
    score, _ = _grade("DynaMath", rows, predictions)
    assert score["score"] == 75.0 and score["parts"]["worst_case"] == 50.0
    assert "## Question\n q\n## Answer Instruction" in get_benchmark("DynaMath").prompt(rows[0])


def test_mathverse_overall_over_all_versions(tmp_path):
    def row(i, version, kind, answer):
        meta = {"problem_version": version, "question_type": kind}
        return {"index": i, "question": "q", "answer": answer, "metadata": str(meta)}

    rows = _rows(
        tmp_path,
        "MathVerse_MINI",
        [
            row(1, "Text Lite", "free-form", "5"),
            row(2, "Text Lite", "multi-choice", "B"),
            row(3, "Vision Only", "free-form", "\\frac{1}{2}"),
            row(4, "Vision Only", "free-form", "12"),
        ],
    )
    # same text right; (B) = B right; 0.5 = 1/2 by the math grader right; 13 != 12 wrong -> 3/4 = 75 %,
    # Text Lite 2/2 = 100 %, Vision Only 1/2 = 50 %
    score, by = _grade("MathVerse_MINI", rows, ["5", "(B)", "0.5", "13"])
    assert score["score"] == 75.0 and score["parts"] == {"Text Lite": 100.0, "Vision Only": 50.0}
    assert by == ["rule"] * 4


def test_mathvision_accuracy(tmp_path):
    rows = _rows(
        tmp_path,
        "MathVision_MINI",
        [
            {"index": 1, "question": "q", "choices": "['2', '4', '6']", "answer": "B"},
            {"index": 2, "question": "q", "choices": "[]", "answer": "3/4"},
            {"index": 3, "question": "q", "choices": "[]", "answer": "\\sqrt{2}"},
        ],
    )
    # option B right; 0.75 = 3/4 right; 2 != sqrt(2) wrong -> 2/3
    score, _ = _grade("MathVision_MINI", rows, ["B", "0.75", "2"])
    assert score["score"] == pytest.approx(200 / 3)


def test_mmmu_pro_v_accuracy_with_open_questions(tmp_path):
    options = {"A": "1", "B": "2", "C": "3", "D": "4"}
    rows = _rows(
        tmp_path,
        "MMMU_Pro_V",
        [
            {"index": 1, **options, "answer": "C"},
            {"index": 2, **options, "answer": "C"},
            {"index": 3, "answer": "42"},  # an open question: A = 42, B = Other Answers, truth A
        ],
    )
    # C right; "The answer is D" names D, wrong; 42 is option A's text, right -> 2/3
    score, _ = _grade("MMMU_Pro_V", rows, ["C", "The answer is D", "42"])
    assert score["score"] == pytest.approx(200 / 3)
    assert (
        get_benchmark("MMMU_Pro_V")
        .prompt(rows[0])
        .startswith("Answer the following multiple-choice question")
    )


def test_every_paper_benchmark_is_registered_with_its_metric():
    metrics = {name: get_benchmark(name).metric for name in PAPER_BENCHMARKS}
    assert metrics == {
        "LogicVista": "acc",
        "MathVista_MINI": "acc",
        "WeMath": "Score (Strict)",
        "DynaMath": "Overall",
        "MathVerse_MINI": "Overall",
        "MathVision_MINI": "acc",
        "MMMU_Pro_V": "acc",
    }


# ---------------------------------------------------------------- runs, table, files


def test_score_runs_scores_each_run_as_a_benchmark(tmp_path):
    rows = _rows(
        tmp_path,
        "LogicVista",
        [{"index": 1, "question": "q", "answer": "A"}, {"index": 2, "question": "q", "answer": "B"}],
    )
    responses = [  # question i's 3 responses; run k = every question's k-th
        ["<think>.</think>\\boxed{A}", "\\boxed{A}", "\\boxed{C}"],
        ["\\boxed{B}", "\\boxed{C}", "no box"],
    ]
    result = score_runs(get_benchmark("LogicVista"), rows, responses)
    # runs: 2/2 = 100, 1/2 = 50, 0/2 = 0 -> mean 50, sample std sqrt((50² + 0 + 50²) / 2) = 50
    assert result["runs"] == [100.0, 50.0, 0.0]
    assert result["mean"] == 50.0 and result["std"] == pytest.approx(50.0)
    assert result["verdicts"] == {"rule": 5, "unresolved": 1}


def test_paper_table_has_benchmark_columns_and_the_average():
    scores = {
        "LogicVista": {"metric": "acc", "mean": 40.0, "std": 1.5},
        "WeMath": {"metric": "Score (Strict)", "mean": 30.0, "std": None},
    }
    lines = paper_table(scores, samples=16).splitlines()
    assert lines[0].split() == ["LogicVista", "WeMath", "Avg"]
    assert lines[2].split() == ["avg@16", "40.00", "30.00", "35.00"]
    assert lines[3].split() == ["std", "1.50", "-"]


def test_run_summary_of_an_evaluator_report():
    questions = [{"accuracy": [1.0, 0.0]}, {"accuracy": [1.0, 1.0]}]
    # run 0: 2/2 = 100, run 1: 1/2 = 50 -> mean 75, std sqrt(2 · 25²) = 35.36
    summary = run_summary(questions)
    assert summary["runs"] == [100.0, 50.0] and summary["mean"] == 75.0
    assert summary["std"] == pytest.approx(35.355, abs=1e-3)


def test_resolve_files_by_folder_stem_and_name(tmp_path):
    for name in ("DynaMath", "WeMath"):
        write_tsv(tmp_path / f"{name}.tsv", [{"index": 1, "answer": "A"}])
    assert [b.name for b, _ in resolve_files([str(tmp_path)])] == ["WeMath", "DynaMath"]  # the paper's order
    assert resolve_files([str(tmp_path / "WeMath.tsv")])[0][0].name == "WeMath"
    assert resolve_files([f"LogicVista={tmp_path / 'x.tsv'}"])[0][0].name == "LogicVista"
    with pytest.raises(TsvError, match="name it as NAME="):
        resolve_files([str(tmp_path / "mine.tsv")])
    with pytest.raises(ValueError, match="unknown benchmark 'Nope'"):
        resolve_files([f"Nope={tmp_path / 'x.tsv'}"])
    with pytest.raises(TsvError, match="more than once"):
        resolve_files([str(tmp_path), str(tmp_path / "WeMath.tsv")])


# ---------------------------------------------------------------- the judge, against a local stub


class _Stub(BaseHTTPRequestHandler):
    replies: list[str] = []
    prompts: list[str] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).prompts.append(body["messages"][0]["content"])
        reply = type(self).replies.pop(0) if type(self).replies else "ready"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_judge():
    _Stub.replies, _Stub.prompts = [], []
    server = HTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1", _Stub
    server.shutdown()
    server.server_close()


def test_the_judge_settles_only_what_the_rule_cannot(tmp_path, stub_judge):
    url, stub = stub_judge
    rows = _rows(
        tmp_path,
        "LogicVista",
        [
            {"index": 1, "question": "Which?", "answer": "D"},
            {"index": 2, "question": "Which?", "answer": "A"},
        ],
    )
    judge = ChatJudge(url, model="stub")
    judge.check()
    stub.replies = ["D"]  # for "the dog": the judge reads it as D
    responses = [["\\boxed{the dog}", "\\boxed{the dog}"], ["\\boxed{A}", "\\boxed{B}"]]
    result = score_runs(get_benchmark("LogicVista"), rows, responses, judge=judge)
    # run 0: the dog -> judge D right, A right = 100; run 1: the dog (cached) right, B wrong = 50
    assert result["runs"] == [100.0, 50.0]
    assert result["verdicts"] == {"judge": 2, "rule": 2}
    assert len(stub.prompts) == 2 and "the dog" in stub.prompts[1]  # check() + one question; run 1 cached
    assert judge.calls == 1 and judge.failures == 0


def test_the_judge_fails_early_on_a_dead_endpoint():
    judge = ChatJudge("http://127.0.0.1:9/v1", timeout_s=2)
    with pytest.raises(JudgeError, match="cannot be reached") as e:
        judge.check()
    assert "127.0.0.1:9/v1/chat/completions" in str(e.value)
    with pytest.raises(JudgeError, match="give an http"):
        ChatJudge("localhost:8000")
