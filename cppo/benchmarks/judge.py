"""The LLM judge: any OpenAI-compatible chat endpoint, asked only what the local grader cannot settle.

VLMEvalKit scores the seven benchmarks with a judge model (the official evaluation used gpt-4o-mini:
its summary script, vbdi/cppo ``eval-VLMEvalKit/create_performance_summary.py``, reads files named
``*_gpt4o-mini_score`` / ``*_gpt-4o-mini_score``). Each benchmark first tries a rule on the
prediction (an option letter, a number) and asks the judge only when that rule fails; LogicVista and
MathVerse ask it more often (``cppo.benchmarks.suite`` says when, per benchmark). The questions here
are the same kinds VLMEvalKit asks (which option, which letters, the short answer, are two answers
the same), in this project's own words, so a judge's verdicts follow that protocol but are not
byte-identical prompts.

    judge = ChatJudge("http://localhost:8000/v1", model="gpt-4o-mini")   # or https://api.openai.com/v1
    judge.check()                 # one small request before any model is loaded: a dead endpoint fails early

The key, when the endpoint needs one, is read from the environment variable named by ``key_env``
(default ``OPENAI_API_KEY``); it is sent as a Bearer token and never written anywhere. Answers are
cached per prompt, so the 16 runs of one question ask about each distinct prediction once. A call
that still fails after ``retries`` attempts is counted (``failures``) and leaves the prediction
unresolved (wrong), as VLMEvalKit does after its retries.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request


class JudgeError(RuntimeError):
    """The judge endpoint cannot be used (one line naming the URL and what to do)."""


def chat_url(url: str) -> str:
    """The chat-completions address of an endpoint given as its base (``.../v1``) or in full."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else f"{url}/chat/completions"


class ChatJudge:
    """Asks an OpenAI-compatible ``/chat/completions`` endpoint, at temperature 0, with urllib."""

    def __init__(
        self,
        url: str,
        model: str = "gpt-4o-mini",
        key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        retries: int = 3,
    ):
        if not url.startswith(("http://", "https://")):
            raise JudgeError(f"--judge {url}: give an http(s) URL such as http://localhost:8000/v1")
        self.url = chat_url(url)
        self.model = model
        self.key_env = key_env
        self.timeout_s = timeout_s
        self.retries = retries
        self.calls = 0
        self.failures = 0
        self._cache: dict[str, str | None] = {}

    def _post(self, prompt: str) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": 128,
        }
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            reply = json.loads(response.read().decode("utf-8"))
        return str(reply["choices"][0]["message"]["content"] or "").strip()

    def ask(self, prompt: str) -> str | None:
        """The judge's reply to one prompt (cached), or None when every attempt failed."""
        if prompt in self._cache:
            return self._cache[prompt]
        reply = None
        for attempt in range(self.retries):
            self.calls += 1
            try:
                reply = self._post(prompt)
                break
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError):
                time.sleep(min(2.0**attempt, 8.0) if attempt + 1 < self.retries else 0)
        if reply is None:
            self.failures += 1
        self._cache[prompt] = reply
        return reply

    def check(self) -> None:
        """One request; ``JudgeError`` (one line) if the endpoint does not answer like a chat model."""
        try:
            self._post("Reply with the single word: ready")
        except urllib.error.HTTPError as e:
            hint = f" (set {self.key_env})" if e.code in (401, 403) else ""
            raise JudgeError(
                f"--judge {self.url} answered HTTP {e.code}{hint}; check the URL, model and key"
            ) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise JudgeError(
                f"--judge {self.url} cannot be reached ({reason}); start the server or fix the URL"
            ) from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(
                f"--judge {self.url} did not answer in the OpenAI chat format (choices[0].message.content)"
            ) from None

    # ---- the questions the benchmarks ask (cppo.benchmarks.suite)

    def pick_option(self, question: str, options: dict[str, str], prediction: str) -> str | None:
        """The option letter the prediction means, or None (the judge said none fits, or failed)."""
        listed = "\n".join(f"{k}. {v}" for k, v in options.items())
        reply = self.ask(
            "A model answered a multiple-choice question. Decide which option its answer means.\n"
            f"Question:\n{question}\nOptions:\n{listed}\nModel answer:\n{prediction}\n"
            f"Reply with one letter from {', '.join(options)}, or Z if the answer matches none of them."
        )
        letter = (reply or "").strip().strip(".()").upper()
        return letter if letter in options else None

    def pick_letters(self, question: str, prediction: str) -> str | None:
        """The letters a free-form answer chooses (lower-cased, sorted: "ac"), or None for none."""
        reply = self.ask(
            "A model answered a question whose answer is one or more option letters. Which letters did it "
            "choose? If it chose no letter, infer the choice from the options in the question; if that is "
            "impossible, reply Z.\n"
            f"Question:\n{question}\nModel answer:\n{prediction}\nReply with the letters only, e.g. B or AC."
        )
        letters = re.sub(r"[^A-Z]", "", (reply or "").upper())
        return None if not letters or letters == "Z" else "".join(sorted(set(letters.lower())))

    def extract(self, question: str, prediction: str) -> str | None:
        """The final answer stated in a prediction, as a short string (a number, a letter, a list)."""
        reply = self.ask(
            "Extract the final answer from a model's response to a question. Reply with the answer only "
            "(a number, an option letter, or a short expression), no explanation.\n"
            f"Question:\n{question}\nModel response:\n{prediction}\nExtracted answer:"
        )
        return reply or None

    def agrees(self, question: str, truth: str, prediction: str) -> bool | None:
        """Whether the prediction states the standard answer (same meaning counts: 0.5 m = 50 cm)."""
        reply = self.ask(
            "Decide whether a model's answer to a math question is consistent with the standard answer. "
            "For multiple choice, only the same option counts; otherwise the same value or meaning counts "
            "(0.5 m and 50 cm agree).\n"
            f"Question:\n{question}\nStandard answer: {truth}\nModel answer: {prediction}\n"
            "Reply 1 if consistent, 0 if not."
        )
        digit = (reply or "").strip()[:1]
        return None if digit not in ("0", "1") else digit == "1"

    def short_answer(self, prediction: str, instruction: str) -> str | None:
        """DynaMath's reformatting: the free-form prediction as the short answer ``instruction`` asks for."""
        reply = self.ask(
            f"Free-form answer: {prediction}\nInstruction: {instruction}\nReply in a single line."
        )
        return reply.splitlines()[0].strip() if reply else None
