"""frontier_eval against a real HTTP server on 127.0.0.1 that speaks both wire formats and injects
faults: 429 with Retry-After, 500, a reply slower than the timeout, malformed JSON, a dropped
connection, and one question that always fails. Checks that nothing is lost, failures keep their
reason, a rerun re-sends nothing already answered (requests counted at the server), and the key
appears in no file. A closed port is given up on in seconds; a URL without a scheme is refused."""
import contextlib
import io
import json
import os
import socket
import tempfile
import threading
import time
import unittest
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest import mock

from runner.main import main
from twohop.data.records import read_records
from twohop.evaluation.frontier.evaluate import TASKS, task_prompts, summarise

KEY = "sk-test-9f8e7d6c5b4a-SECRET"
N_CHAINS = 6


class FakeAPI(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, chains):
        super().__init__(("127.0.0.1", 0), Handler)
        self.answers = {}  # (question, is_cot) -> reply text
        for chain in chains:
            for task, (question, answer, _, style) in task_prompts(chain).items():
                reply = "I do not know." if task.startswith("shortcut") else answer
                if style == "cot":
                    reply = f"{chain['e1']} leads to {chain['e2']}. So the answer is {answer}."
                self.answers[(question, style == "cot")] = reply
        q = [task_prompts(c) for c in chains]
        # One fault per chain, the first time its question is asked (per model); the last one always.
        self.faults = {q[0]["hop_a"][0]: "429", q[1]["hop_b"][0]: "500", q[2]["shortcut_e1"][0]: "slow",
                       q[3]["two_hop_nocot"][0]: "malformed", q[4]["facts_in_context"][0]: "drop"}
        self.always_failing = q[5]["hop_b"][0]
        self.requests = Counter()  # (path, model, question, cot) -> requests received
        self.times = defaultdict(list)
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status: int, body: bytes, headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        openai = self.path == "/v1/chat/completions"
        key = self.headers.get("Authorization", "").removeprefix("Bearer ") if openai else self.headers.get("x-api-key")
        if key != KEY or (not openai and self.path != "/v1/messages"):
            return self.reply(401, b'{"error": "bad key or path"}')
        messages = body["messages"]
        system = next((m["content"] for m in messages if m["role"] == "system"), body.get("system", ""))
        question = messages[-1]["content"]
        ident = (self.path, body["model"], question, "step by step" in system)
        with server.lock:
            server.requests[ident] += 1
            server.times[ident].append(time.monotonic())
            first = server.requests[ident] == 1
        fault = server.faults.get(question) if first and not ident[3] else None
        if question == server.always_failing:
            fault = "500"
        if fault == "429":
            return self.reply(429, b'{"error": "rate limited"}', [("Retry-After", "1")])
        if fault == "500":
            return self.reply(500, b'{"error": "overloaded"}')
        if fault == "slow":
            time.sleep(1.0)  # past the client's timeout
        if fault == "malformed":
            return self.reply(200, b'{"choices": [ {"mess')
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if question.startswith("Question: ") and "\nReference answer: " in question:  # the model grader
            reference = question.split("\nReference answer: ")[1].split("\n")[0].split(" (also:")[0]
            text = "yes" if reference in question.split("\nResponse: ")[1] else "no"
        else:
            text = server.answers[(question, ident[3])]
        if openai:
            data = {"choices": [{"message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": len(question.split()), "completion_tokens": len(text.split())}}
        else:
            data = {"content": [{"type": "text", "text": text}],
                    "usage": {"input_tokens": len(question.split()), "output_tokens": len(text.split())}}
        try:
            self.reply(200, json.dumps(data).encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the slow reply)


def closed_port() -> int:
    """A loopback port nothing listens on: connecting to it is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class FrontierEvalTest(unittest.TestCase):
    def start_server(self, w: Path, faults: bool = True) -> tuple:
        """Real-facts data in `w` and a fake API serving its first N_CHAINS chains (closed after the test)."""
        self.assertEqual(main(["--workspace_path", str(w), "--jobs", "generate_data_real_facts"]), 0)
        chains = read_records(w / "experiments/generate_data/real_facts/data/chains.jsonl", required=("id",))[:N_CHAINS]
        server = FakeAPI(chains)
        if not faults:
            server.faults, server.always_failing = {}, None
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        return server, chains

    def test_faults_retries_cache_and_no_key_on_disk(self):
        with tempfile.TemporaryDirectory() as tmp:
            w = Path(tmp) / "w"
            server, chains = self.start_server(w)
            distinct = {(q, style) for c in chains for q, _, _, style in task_prompts(c).values()}
            port = server.server_address[1]
            endpoints = (f"endpoints=[{{backend: openai, model: fake-gpt, base_url: 'http://127.0.0.1:{port}/v1'}}, "
                         f"{{backend: anthropic, model: fake-claude, base_url: 'http://127.0.0.1:{port}'}}]")
            args = ["--workspace_path", str(w), "--jobs", "frontier_eval_api", "--set", endpoints,
                    "--set", f"max_chains={N_CHAINS}", "--set", "http.timeout_s=0.4", "--set", "http.max_retries=3",
                    "--set", "http.backoff_s=0.05", "--set", "http.concurrency=4",
                    "--set", "prices={fake-gpt: [2.5, 10.0]}"]
            with mock.patch.dict(os.environ, {"OPENAI_API_KEY": KEY, "ANTHROPIC_API_KEY": KEY}):
                self.assertEqual(main(args), 0)
                first = Counter(server.requests)
                run = w / "experiments/frontier_eval/api"
                for model in ("openai_fake-gpt", "anthropic_fake-claude"):
                    rows = read_records(run / model / "questions.jsonl", required=("task",))
                    self.assertEqual(len(rows), N_CHAINS * len(TASKS))  # nothing lost
                    failed = [r for r in rows if r["error"]]
                    self.assertEqual([(r["id"], r["task"]) for r in failed], [(chains[5]["id"], "hop_b")])
                    self.assertEqual(failed[0]["error"], "HTTP 500 (after 4 attempts)")
                    self.assertEqual(sum(not r["cached"] for r in rows), len(distinct))  # repeats asked once
                    self.assertEqual([(r["task"], r["response"]) for r in rows if not r["error"] and r["correct"] != (not r["task"].startswith("shortcut"))], [], model)
                    results = json.loads((run / model / "results.json").read_text())
                    self.assertEqual(results["failed"], 1)
                    self.assertEqual(results["headline"]["n"], N_CHAINS - 1)  # the failed hop B drops chain 5
                    self.assertEqual(results["headline"]["two_hop_nocot"]["accuracy"], 1.0)
                    self.assertEqual(results["headline"]["two_hop_cot"]["accuracy"], 1.0)
                    self.assertEqual(results["tasks"]["shortcut_e1"]["accuracy"], 0.0)
                gpt = json.loads((run / "openai_fake-gpt/results.json").read_text())
                self.assertAlmostEqual(gpt["cost_usd"], (gpt["tokens"]["input"] * 2.5 + gpt["tokens"]["output"] * 10) / 1e6)
                # Each injected fault cost exactly one extra request; the 429 retry waited for Retry-After.
                for path, model in (("/v1/chat/completions", "fake-gpt"), ("/v1/messages", "fake-claude")):
                    for question, fault in server.faults.items():
                        self.assertEqual(first[(path, model, question, False)], 2, (model, fault))
                    self.assertEqual(first[(path, model, server.always_failing, False)], 4)
                    waited = server.times[(path, model, chains[0]["questions"]["hop_a"], False)]
                    self.assertGreaterEqual(waited[1] - waited[0], 0.95)
                self.assertEqual(sum(first.values()), 2 * (len(distinct) + len(server.faults) + 3))

                # A rerun sends nothing that was answered; only the failed question is asked again.
                self.assertEqual(main(args + ["--force"]), 0)
                again = Counter(server.requests) - first
                self.assertEqual(set(again), {(p, m, server.always_failing, False) for p, m in
                                              (("/v1/chat/completions", "fake-gpt"), ("/v1/messages", "fake-claude"))})
                rerun = json.loads((run / "openai_fake-gpt/results.json").read_text())
                self.assertEqual(rerun["asked_now"], 1)
                self.assertEqual(rerun["tokens"]["input"], 0)  # nothing answered was paid for again
                self.assertEqual(rerun["headline"], gpt["headline"])

            # The key is in no file the runs wrote (configs, logs, questions, cache).
            for path in w.rglob("*"):
                if path.is_file():
                    self.assertNotIn(KEY, path.read_text(errors="replace"), path)
            self.assertTrue(list((w / "experiments/runner").glob("*.log")))

    def test_model_grader_verdicts_are_used_and_cached(self):
        with tempfile.TemporaryDirectory() as tmp:
            w = Path(tmp) / "w"
            server, _ = self.start_server(w, faults=False)
            url = f"http://127.0.0.1:{server.server_address[1]}/v1"
            args = ["--workspace_path", str(w), "--jobs", "frontier_eval_api", "--set", f"max_chains={N_CHAINS}",
                    "--set", f"endpoints=[{{backend: openai, model: fake-gpt, base_url: '{url}'}}]",
                    "--set", f"grader={{backend: openai, model: fake-grader, base_url: '{url}'}}"]
            with mock.patch.dict(os.environ, {"OPENAI_API_KEY": KEY}):
                self.assertEqual(main(args), 0)
                graded = Counter({k: v for k, v in server.requests.items() if k[1] == "fake-grader"})
                rows = read_records(w / "experiments/frontier_eval/api/openai_fake-gpt/questions.jsonl", required=("task",))
                self.assertEqual(len(rows), N_CHAINS * len(TASKS))
                self.assertEqual({r["grader_correct"] for r in rows}, {True, False})  # yes and no both parsed
                self.assertTrue(all(r["grader_correct"] == r["correct"] for r in rows))  # the grader agrees here
                self.assertGreater(sum(graded.values()), 0)
                results = json.loads((w / "experiments/frontier_eval/api/openai_fake-gpt/results.json").read_text())
                self.assertEqual(results["graded_by"], "model grader")
                self.assertEqual(main(args + ["--force"]), 0)  # verdicts come from the cache
                self.assertEqual(Counter({k: v for k, v in server.requests.items() if k[1] == "fake-grader"}), graded)

    def test_missing_key_is_one_line_before_anything_is_written(self):
        with tempfile.TemporaryDirectory() as tmp:
            w, err = Path(tmp) / "w", io.StringIO()
            with mock.patch.dict(os.environ, {}, clear=False), contextlib.redirect_stderr(err):
                os.environ.pop("MY_KEY_VAR", None)
                code = main(["--workspace_path", str(w), "--jobs", "frontier_eval_api", "--set",
                             "endpoints=[{backend: openai, model: m, base_url: 'http://127.0.0.1:9/v1', api_key_env: MY_KEY_VAR}]"])
            self.assertEqual(code, 2)
            self.assertEqual(len(err.getvalue().strip().splitlines()), 1)
            self.assertIn("environment variable MY_KEY_VAR is not set", err.getvalue())
            self.assertFalse(w.exists())

    def test_a_closed_port_is_given_up_in_seconds_and_every_question_recorded_as_not_asked(self):
        with tempfile.TemporaryDirectory() as tmp:
            w = Path(tmp) / "w"
            server, _ = self.start_server(w, faults=False)
            closed = f"http://127.0.0.1:{closed_port()}/v1"
            up = f"http://127.0.0.1:{server.server_address[1]}/v1"
            args = ["--workspace_path", str(w), "--jobs", "frontier_eval_api", "--set", f"max_chains={N_CHAINS}",
                    "--set", f"endpoints=[{{backend: openai, model: gone, base_url: '{closed}'}}, "
                             f"{{backend: openai, model: fake-gpt, base_url: '{up}'}}]",
                    "--set", f"grader={{backend: openai, model: grader, base_url: '{closed}'}}"]
            with mock.patch.dict(os.environ, {"OPENAI_API_KEY": KEY}):
                started = time.monotonic()
                code = main(args)  # the default retry settings: 5 retries from 1 s, 8 at a time
                seconds = time.monotonic() - started
            self.assertLess(seconds, 10)  # before: 45 s for 2 chains, and a retry cycle per question
            self.assertEqual(code, 1)  # an endpoint that answered nothing fails the run, after writing it all
            run = w / "experiments/frontier_eval/api"
            rows = read_records(run / "openai_gone/questions.jsonl", required=("task",))
            self.assertEqual(len(rows), N_CHAINS * len(TASKS))
            reason = f"not asked: endpoint down, {closed}: Connection refused (3 connection attempts in a row)"
            self.assertEqual({(r["asked"], r["error"]) for r in rows}, {(False, reason)})
            gone = json.loads((run / "openai_gone/results.json").read_text())
            self.assertEqual((gone["asked"], gone["not_asked"], gone["failed"]), (0, len(rows), 0))
            # The endpoint that is up is asked as usual; its verdicts, the grader being down, are not asked.
            fine = json.loads((run / "openai_fake-gpt/results.json").read_text())
            self.assertEqual((fine["asked"], fine["not_asked"], fine["failed"]), (len(rows), 0, 0))
            graded = read_records(run / "openai_fake-gpt/questions.jsonl", required=("task",))
            self.assertEqual({(r["grader_correct"], r["grader_error"]) for r in graded}, {(None, reason)})
            self.assertIn("| openai:gone |", (run / "summary.md").read_text())
            warnings = [line for line in (run / "log.txt").read_text().splitlines() if " WARNING " in line]
            self.assertEqual(len(warnings), 2)  # one line for each endpoint that went down
            self.assertTrue(warnings[0].endswith(f"openai:gone: {len(rows)} of {len(rows)} questions {reason}"))
            self.assertTrue(warnings[1].endswith(f"grader openai:grader: {len(rows)} of {len(rows)} verdicts {reason}"))

    def test_a_url_without_a_scheme_is_refused_before_anything_runs(self):
        with tempfile.TemporaryDirectory() as tmp:
            w = Path(tmp) / "w"
            err = io.StringIO()
            with mock.patch.dict(os.environ, {"OPENAI_API_KEY": KEY}), contextlib.redirect_stderr(err):
                code = main(["--workspace_path", str(w), "--jobs", "frontier_eval_api", "--set",
                             "endpoints=[{backend: openai, model: m, base_url: '127.0.0.1:8000/v1'}]"])
            self.assertEqual(code, 2)
            self.assertEqual(err.getvalue().strip().splitlines(), [
                "error: frontier_eval_api: endpoints[0].base_url: '127.0.0.1:8000/v1' is not an http(s) URL with a "
                "host; write it in full, e.g. 'http://127.0.0.1:8000/v1' or 'https://127.0.0.1:8000/v1'"])
            self.assertFalse((w / "experiments/generate_data").exists())

    def test_filter_keeps_chains_with_both_hops_right_and_both_shortcuts_wrong(self):
        def row(chain, task, correct):
            return {"id": chain, "relation": "r", "task": task, "correct": correct, "error": "", "asked": True,
                    "cached": False, "input_tokens": 1, "output_tokens": 1}
        rows = []
        for chain, (a, b, s1, s2, nocot) in {"c1": (True, True, False, False, True),
                                             "c2": (True, False, False, False, True),  # hop B wrong
                                             "c3": (True, True, True, False, True),  # shortcut works
                                             "c4": (True, True, False, False, False)}.items():
            values = {"hop_a": a, "hop_b": b, "shortcut_e1": s1, "shortcut_no_e1": s2, "two_hop_nocot": nocot,
                      "two_hop_cot": True, "facts_in_context": True}
            rows += [row(chain, task, values[task]) for task in TASKS]
        summary = summarise(rows)
        self.assertEqual(summary["headline"]["n"], 2)  # c1 and c4
        self.assertEqual(summary["headline"]["two_hop_nocot"]["accuracy"], 0.5)
        self.assertEqual(summary["both_hops_right"]["n"], 3)
        self.assertEqual(summary["tasks"]["two_hop_nocot"]["accuracy"], 0.75)


if __name__ == "__main__":
    unittest.main()
