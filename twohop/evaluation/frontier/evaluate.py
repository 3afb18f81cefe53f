"""Seven tasks per real two-hop chain, asked of one model, graded, and summarised.

Tasks (as in the reference): hop A alone; hop B alone; the two-hop question without and with a
chain of thought; shortcut 1 (r2 applied to e1, skipping the bridge); shortcut 2 (the composed
relation with e1 removed); both facts in the prompt, then the two-hop question. Headline: no-CoT and
CoT accuracy on the chains whose two hops are both answered right and whose shortcuts both fail,
leaving out the chains the data sets aside (a name gives the answer away, an ambiguous value, a
Hopping-Too-Late fragment): the same figures on those are reported beside it.
"""

from tqdm.auto import tqdm

from twohop.evaluation import grading
from twohop.evaluation.frontier.backends import Request
from twohop.evaluation.frontier.cache import cache_key
from twohop.data import tables
from twohop.data.real_facts import SET_ASIDE, set_aside_per_relation
from twohop.stats import binomial_se

TASKS = ("hop_a", "hop_b", "two_hop_nocot", "two_hop_cot", "shortcut_e1", "shortcut_no_e1", "facts_in_context")


def task_prompts(chain: dict) -> dict:
    """task -> (question, gold answer, aliases, style)."""
    q = chain["questions"]
    facts = f"Q: {q['hop_a']} A: {chain['e2']}.\nQ: {q['hop_b']} A: {chain['e3']}.\n\n{q['two_hop']}"
    e2, e3 = (chain["e2"], chain["e2_aliases"]), (chain["e3"], chain["e3_aliases"])
    return {"hop_a": (q["hop_a"], *e2, "nocot"), "hop_b": (q["hop_b"], *e3, "nocot"),
            "two_hop_nocot": (q["two_hop"], *e3, "nocot"), "two_hop_cot": (q["two_hop"], *e3, "cot"),
            "shortcut_e1": (q["shortcut_e1"], *e3, "nocot"), "shortcut_no_e1": (q["shortcut_no_e1"], *e3, "nocot"),
            "facts_in_context": (facts, *e3, "nocot")}


def accuracy(graded: list) -> dict:
    """Mean and standard error of a list of booleans (None for both when it is empty)."""
    if not graded:
        return {"accuracy": None, "se": None, "n": 0}
    p = sum(graded) / len(graded)
    return {"accuracy": p, "se": binomial_se(p, len(graded)), "n": len(graded)}


def ask(backend, cache, chains: list, config: dict, log) -> list:
    """Every (chain, task) question of `chains`, answered from the cache or the back end; rows in order."""
    system = tables.templates("system_prompts")
    rows, requests_, keys = [], [], []
    for chain in chains:
        for task, (question, answer, aliases, style) in task_prompts(chain).items():
            messages = [{"role": "system", "content": system[style]}, {"role": "user", "content": question}]
            params = {"max_tokens": config[f"{style}_max_tokens"], "temperature": 0}
            rows.append({"id": chain["id"], "relation": chain["relation"], "task": task, "style": style,
                         "e1": chain["e1"], "e2": chain["e2"], "e3": chain["e3"], "question": question,
                         "answer": answer, "aliases": aliases, "answer_intermediate": chain["e2"],
                         **{reason: chain.get(reason, "") for reason in SET_ASIDE}})
            requests_.append(Request(messages, params["max_tokens"]))
            keys.append(cache_key(backend.identity(), messages, params))
    cached = {k: cache.get(k) for k in keys}
    todo = list(dict.fromkeys(k for k in keys if cached[k] is None))  # identical questions are asked once
    log.info("%s: %d questions, %d distinct to ask (the rest cached or repeated)", backend.name, len(rows), len(todo))
    bar = tqdm(total=len(todo), desc=backend.name, unit="q", dynamic_ncols=True, disable=not todo)

    def done(index, reply):
        cache.put(todo[index], reply)
        bar.update(1)

    fresh = dict(zip(todo, backend.complete_many([requests_[keys.index(k)] for k in todo], done)))
    bar.close()
    answers, unpaid = {**cached, **fresh}, set(fresh)
    for row, key in zip(rows, keys):
        reply = answers[key]
        row.update(response=reply.text, error=reply.error, asked=reply.asked, cached=key not in unpaid,
                   attempts=reply.attempts, input_tokens=reply.input_tokens, output_tokens=reply.output_tokens)
        unpaid.discard(key)  # a repeated question is paid for once: its later rows count as cached
        row["correct"] = None if reply.error else grading.grade(row, reply.text, row["style"], (), row["aliases"])["correct"]
    return rows


GRADER_PROMPT = ("Question: {question}\nReference answer: {answer}{aliases}\nResponse: {response}\n\n"
                 "Does the response give the reference answer (or an equivalent name) as its final answer? "
                 "Reply with one word: yes or no.")


def grade_with_model(grader, cache, rows: list, log) -> None:
    """Add `grader_correct` (the grader's yes/no) to every answered row; verdicts are cached too."""
    answered = [r for r in rows if not r["error"]]
    requests_, keys = [], []
    for row in answered:
        aliases = f" (also: {', '.join(row['aliases'])})" if row["aliases"] else ""
        prompt = GRADER_PROMPT.format(question=row["question"], answer=row["answer"], aliases=aliases,
                                      response=row["response"])
        messages = [{"role": "user", "content": prompt}]
        requests_.append(Request(messages, 4))
        keys.append(cache_key(grader.identity(), messages, {"max_tokens": 4, "temperature": 0}))
    verdicts = [cache.get(k) for k in keys]
    todo = [i for i, v in enumerate(verdicts) if v is None]
    log.info("grader %s: %d verdicts, %d cached", grader.name, len(answered), len(answered) - len(todo))
    for i, verdict in zip(todo, grader.complete_many([requests_[i] for i in todo],
                                                    lambda index, reply: cache.put(keys[todo[index]], reply))):
        verdicts[i] = verdict
    for row, verdict in zip(answered, verdicts):
        row["grader_correct"] = None if verdict.error else grading.normalize(verdict.text).startswith("yes")
        row["grader_error"] = verdict.error
    not_asked = [v.error for v in verdicts if not v.asked]
    if not_asked:
        log.warning("grader %s: %d of %d verdicts %s", grader.name, len(not_asked), len(verdicts), not_asked[0])


def token_counts(rows: list, prices=None) -> tuple:
    """(tokens sent now and served from the cache, the cost of those sent now or None without prices)."""
    fresh = [r for r in rows if not r["cached"] and not r["error"]]
    tokens = {"input": sum(r["input_tokens"] for r in fresh), "output": sum(r["output_tokens"] for r in fresh),
              "input_cached": sum(r["input_tokens"] for r in rows if r["cached"]),
              "output_cached": sum(r["output_tokens"] for r in rows if r["cached"])}
    cost = (tokens["input"] * prices[0] + tokens["output"] * prices[1]) / 1e6 if prices else None
    return tokens, cost


def summarise(rows: list, prices=None) -> dict:
    """Per task accuracy, the filtered headline, failures and token accounting for one model."""
    use_grader = any("grader_correct" in r for r in rows)
    # Failed: asked and left without an answer; a question not asked (its endpoint down) is counted apart.
    failed = lambda r: r["asked"] and r["error"] != ""  # noqa: E731
    verdict = (lambda r: r.get("grader_correct")) if use_grader else (lambda r: r["correct"])
    by_chain = {}
    for row in rows:
        by_chain.setdefault(row["id"], {})[row["task"]] = row
    tasks = {}
    for task in TASKS:
        tasks[task] = {**accuracy([verdict(c[task]) for c in by_chain.values() if verdict(c[task]) is not None]),
                       "failed": sum(failed(c[task]) for c in by_chain.values()),
                       "not_asked": sum(not c[task]["asked"] for c in by_chain.values())}

    def filtered(keep) -> dict:
        chosen = [c for c in by_chain.values() if keep(c)]
        out = {"n": len(chosen)}
        for task in ("two_hop_nocot", "two_hop_cot", "facts_in_context"):
            out[task] = accuracy([verdict(c[task]) for c in chosen if verdict(c[task]) is not None])
        return out

    hops_right = lambda c: verdict(c["hop_a"]) is True and verdict(c["hop_b"]) is True  # noqa: E731
    set_aside = lambda c: any(c["two_hop_nocot"].get(reason) for reason in SET_ASIDE)  # noqa: E731
    shortcuts_fail = lambda c: verdict(c["shortcut_e1"]) is False and verdict(c["shortcut_no_e1"]) is False  # noqa: E731
    per_relation = set_aside_per_relation([c["two_hop_nocot"] for c in by_chain.values()])
    not_asked = sum(not r["asked"] for r in rows)
    tokens, cost = token_counts(rows, prices)
    return {"chains": len(by_chain), "graded_by": "model grader" if use_grader else "alias matching",
            "tasks": tasks, "both_hops_right": filtered(hops_right),
            "headline": filtered(lambda c: hops_right(c) and shortcuts_fail(c) and not set_aside(c)),
            # The chains set aside, under the same filter: beside the headline, never in it.
            "headline_set_aside": filtered(lambda c: hops_right(c) and shortcuts_fail(c) and set_aside(c)),
            "set_aside": {"chains": sum(map(set_aside, by_chain.values())),
                          **{reason: sum(c[reason] for c in per_relation.values()) for reason in SET_ASIDE}},
            "set_aside_per_relation": per_relation,
            "failed": sum(map(failed, rows)), "requests": len(rows), "asked": len(rows) - not_asked,
            "not_asked": not_asked, "asked_now": sum(r["asked"] and not r["cached"] for r in rows),
            "tokens": tokens, "cost_usd": cost,
            "failure_reasons": sorted({r["error"] for r in rows if r["error"]})[:20]}
