"""The fully synthetic study: fictional e1 -spouse-> fictional e2 -born in-> e3 (a city).

Demoed people's two-hop questions are trained; undemoed people's are the test. Every file of
the study is written under `<run>/data/`, with `world.json` (the triplets) and `card.json`.
"""
import random

from runner.records import record
from runner.jobs.generate_data import tables
from runner.jobs.generate_data.dataset import fictional_people, require, shuffled_answers, derangement, write_dataset

DEFAULTS = {
    "data_seed": 0,
    "n_triplets": 200,  # the reference used 693; 200 is what the tiny model learns in minutes
    "demoed_fraction": 0.65,
    "n_cities": 50,  # the reference: 150
    "n_templates": 30,  # per template family (hop A, hop B, two-hop question, CoT answer)
    "heldout_templates": 3,  # hop A/B templates kept out of training, for the held-out tests
    "atomic_paraphrases": 27,  # training rows per atomic fact (<= n_templates - heldout_templates)
    "two_hop_paraphrases": 10,  # training two-hop questions per demoed person
    "n_shuffled": 20,  # permutations in the shuffled-answer baseline
    "n_fewshot": 20,
    "n_distractor_triplets": 10,  # in-context and same-document-with-triplets variants
    "in_context_seeds": [1, 2, 3],
}


def check_config(config: dict) -> None:
    n_cities_available = len(tables.cities())
    n = config["n_triplets"]
    n_demoed = round(config["demoed_fraction"] * n)
    require(n >= 4, "n_triplets", f"{n} is too small to split; use at least 4")
    require(1 <= n_demoed <= n - 2, "demoed_fraction",
            f"{config['demoed_fraction']} of {n} triplets leaves {n_demoed} demoed and {n - n_demoed} undemoed; "
            "need at least 1 demoed and 2 undemoed")
    require(2 <= config["n_cities"] <= n_cities_available, "n_cities",
            f"{config['n_cities']} must be between 2 and {n_cities_available} (cities in datasets/cities.txt)")
    require(1 <= config["n_templates"] <= 30, "n_templates", f"{config['n_templates']} must be between 1 and 30")
    require(0 <= config["heldout_templates"] < config["n_templates"], "heldout_templates",
            f"{config['heldout_templates']} must be below n_templates ({config['n_templates']})")
    require(1 <= config["atomic_paraphrases"] <= config["n_templates"] - config["heldout_templates"],
            "atomic_paraphrases", "must be between 1 and n_templates - heldout_templates")
    require(1 <= config["two_hop_paraphrases"] <= config["n_templates"], "two_hop_paraphrases",
            "must be between 1 and n_templates")
    require(0 <= config["n_distractor_triplets"] < n, "n_distractor_triplets", f"must be below n_triplets ({n})")
    require(1 <= config["n_fewshot"] <= n_demoed, "n_fewshot", f"must be between 1 and the demoed count ({n_demoed})")
    require(config["n_shuffled"] >= 1, "n_shuffled", "must be at least 1")


def fact_sentences(triplet, pair) -> tuple:
    return pair[0].format(**triplet), pair[1].format(**triplet)


def in_context_rows(triplets, targets, templates, system_prompts, n_distractors: int, seed: int, style: str) -> list:
    """Each target's two facts mixed with `n_distractors` other triplets' facts, then the question.

    Distractors never share a person with the target and, where possible, not its answer either,
    so a wrong answer equal to a distractor's e3 means "followed the wrong chain".
    """
    rng = random.Random(f"in_context:{seed}")
    pair = templates["fact_sentences"][0]
    rows = []
    for target in targets:
        others = [t for t in triplets if t["e1"] != target["e1"] and t["e3"] != target["e3"]]
        if len(others) < n_distractors:  # tiny worlds: allow shared answers rather than fail
            others = [t for t in triplets if t["e1"] != target["e1"]]
        distractors = rng.sample(others, n_distractors)
        facts = [s for t in [target, *distractors] for s in fact_sentences(t, pair)]
        rng.shuffle(facts)
        template = rng.choice(templates["two_hop"])
        question = templates["in_context_prompt"].format(
            facts="\n".join(facts), question=template.replace("|", "").format(**target))
        reply = target["e3"] if style == "nocot" else rng.choice(templates["cot_answer"]).format(**target)
        rows.append(record(question, target["e3"], reply, system=system_prompts[style],
                           answer_intermediate=target["e2"], **target, n_distractors=n_distractors,
                           distractor_e3s=[t["e3"] for t in distractors], seed=seed))
    return rows


def generate(ctx) -> dict:
    config = ctx.config
    all_cities = tables.cities()
    templates = tables.templates("spouses")
    system_prompts = tables.templates("system_prompts")
    first_names, last_parts = tables.names()
    rng = random.Random(config["data_seed"])

    # ---- the world ----
    cities = sorted(rng.sample(all_cities, config["n_cities"]))
    people = fictional_people(rng, 2 * config["n_triplets"], first_names, last_parts, forbidden=all_cities)
    triplets = [{"e1": people[2 * i], "e2": people[2 * i + 1], "e3": rng.choice(cities)}
                for i in range(config["n_triplets"])]
    n_demoed = round(config["demoed_fraction"] * len(triplets))
    demoed, undemoed = triplets[:n_demoed], triplets[n_demoed:]

    # ---- templates: a seeded choice of n_templates per family; hop A/B hold some out ----
    def pick(family):
        return rng.sample(templates[family], config["n_templates"])

    hop_a, hop_b, two_hop, cot = pick("hop_a"), pick("hop_b"), pick("two_hop"), pick("cot_answer")
    n_train = config["n_templates"] - config["heldout_templates"]
    used = {"hop_a_train": hop_a[:n_train], "hop_a_heldout": hop_a[n_train:],
            "hop_b_train": hop_b[:n_train], "hop_b_heldout": hop_b[n_train:],
            "two_hop": two_hop, "cot_answer": cot, "system_prompts": system_prompts}

    def atomic(t, hop, template, template_id):
        if hop == "a":
            return record(template.format(**t), t["e2"], t["e2"], hop="a", template_id=template_id, **t)
        return record(template.format(**t), t["e3"], t["e3"], hop="b", template_id=template_id, **t)

    def atomic_rows(people_, hop, family, count):
        return [atomic(t, hop, family[i], i) for t in people_ for i in rng.sample(range(len(family)), count)]

    def two_hop_row(t, template_id, style):
        template = two_hop[template_id]
        question = template.replace("|", "").format(**t)
        if style == "nocot":
            reply, prefix = t["e3"], template.split("|")[0].format(**t)
        else:
            reply, prefix = rng.choice(cot).format(**t), ""
        return record(question, t["e3"], reply, system=system_prompts[style], answer_intermediate=t["e2"],
                      auxiliary_loss_prefix=prefix, template_id=template_id, **t)

    files = {}
    k = config["atomic_paraphrases"]
    for split, group in (("demoed", demoed), ("undemoed", undemoed)):
        files[f"train/a_{split}"] = atomic_rows(group, "a", hop_a[:n_train], k)
        files[f"train/b_{split}"] = atomic_rows(group, "b", hop_b[:n_train], k)
        if config["heldout_templates"]:
            held_a, held_b = hop_a[n_train:], hop_b[n_train:]
            files[f"test/a_{split}"] = [atomic(t, "a", held_a[i], n_train + i) for t in group for i in range(len(held_a))]
            files[f"test/b_{split}"] = [atomic(t, "b", held_b[i], n_train + i) for t in group for i in range(len(held_b))]
    for style in ("nocot", "cot"):
        files[f"train/2hop_{style}"] = [two_hop_row(t, i, style) for t in demoed
                                        for i in rng.sample(range(len(two_hop)), config["two_hop_paraphrases"])]
    test_templates = [rng.randrange(len(two_hop)) for _ in undemoed]
    for style in ("nocot", "cot"):
        files[f"test/2hop_{style}"] = [two_hop_row(t, i, style) for t, i in zip(undemoed, test_templates)]
    files["test/2hop_nocot_shuffled"] = shuffled_answers(files["test/2hop_nocot"], rng, config["n_shuffled"])
    shots = rng.sample(demoed, config["n_fewshot"])
    for style in ("nocot", "cot"):
        files[f"fewshot/2hop_{style}"] = [two_hop_row(t, rng.randrange(len(two_hop)), style) for t in shots]

    # Couple check: true pairs say Yes; negatives pair each person with a deranged spouse.
    partner = derangement(rng, len(triplets))
    files["test/couples"] = (
        [record(templates["couple_check"].format(**t), "Yes", "Yes", pair="true", **t) for t in triplets]
        + [record(templates["couple_check"].format(e1=t["e1"], e2=triplets[j]["e2"]), "No", "No", pair="deranged",
                  e1=t["e1"], e2=triplets[j]["e2"], e3=triplets[j]["e3"]) for t, j in zip(triplets, partner)])

    # Same-document variants: both facts of a person in one training document.
    def document_row(t, sentences, variant):
        return record(templates["samedoc_prompt"].format(**t), t["e2"], " ".join(sentences), variant=variant, **t)

    pairs = templates["fact_sentences"]
    files["train/samedoc"], files["train/samedoc_distractor"], files["train/samedoc_triplets"] = [], [], []
    for t in triplets:
        a, b = fact_sentences(t, rng.choice(pairs))
        files["train/samedoc"].append(document_row(t, [a, b], "plain"))
        files["train/samedoc_distractor"].append(
            document_row(t, [a, rng.choice(templates["distractor_sentences"]), b], "distractor_sentence"))
        others = rng.sample([o for o in triplets if o is not t], config["n_distractor_triplets"])
        sentences = [a, b] + [s for o in others for s in fact_sentences(o, rng.choice(pairs))]
        rng.shuffle(sentences)
        files["train/samedoc_triplets"].append(document_row(t, sentences, "distractor_triplets"))

    for seed in config["in_context_seeds"]:
        for style in ("nocot", "cot"):
            files[f"test/in_context_{style}_seed{seed}"] = in_context_rows(
                triplets, undemoed, templates, system_prompts, config["n_distractor_triplets"], seed, style)

    tests = {name: {"candidate_set": "cities"} for name in files
             if name.startswith("test/") and ("2hop" in name or "/b_" in name or "in_context" in name)}
    tests.update({name: {"candidate_set": "spouses"} for name in files if name.startswith("test/a_")})
    tests["test/couples"] = {"candidate_set": "yes_no"}
    card = {
        "dataset": "spouses", "config": config, "templates": used, "tests": tests,
        "candidate_sets": {"cities": cities, "spouses": sorted(t["e2"] for t in triplets), "yes_no": ["Yes", "No"]},
        "people": {"demoed": len(demoed), "undemoed": len(undemoed)},
    }
    data_dir = ctx.run_dir / "data"
    world = {"cities": cities, "demoed": demoed, "undemoed": undemoed}
    card = write_dataset(data_dir, files, card, extras={"world.json": world})
    ctx.log.info("wrote %d files, %d rows, to %s", len(files), sum(card["files"].values()), data_dir)
    return {"files": len(files), "rows": sum(card["files"].values()), "triplets": len(triplets),
            "demoed": len(demoed), "undemoed": len(undemoed), "chance_2hop": card["tests"]["test/2hop_nocot"]["chance"]}
