"""The fully synthetic study: fictional e1 -spouse-> fictional e2 -born in-> e3 (a city).

Demoed people's two-hop questions are trained; undemoed people's are the test. Every file of
the study is written under `<run>/data/`, with `world.json` (the triplets) and `card.json`.
"""
import random
from dataclasses import dataclass

from runner.config import option
from twohop.data.records import record
from twohop.data import tables
from twohop.data.dataset import derangement, fictional_people, require, shuffled_answers, test_spec, write_dataset

@dataclass
class SpousesConfig:
    data_seed: int = option(0, "seed of the world (people, cities, templates) and of every sample")
    n_triplets: int = option(200, "(e1, e2, e3) chains; the reference used 693, the tiny model learns 200 in minutes",
                             minimum=4)
    demoed_fraction: float = option(0.65, "share of triplets whose two-hop questions are trained", minimum=0.0,
                                    maximum=1.0)
    n_cities: int = option(50, "cities e3 is drawn from (the reference: 150)", minimum=2)
    n_templates: int = option(30, "templates per family (hop A, hop B, two-hop question, CoT answer)", minimum=1,
                              maximum=30)
    heldout_templates: int = option(3, "hop A/B templates kept out of training, for the held-out tests", minimum=0)
    atomic_paraphrases: int = option(27, "training rows per atomic fact (<= n_templates - heldout_templates)",
                                     minimum=1)
    two_hop_paraphrases: int = option(10, "training two-hop questions per demoed person", minimum=1)
    n_shuffled: int = option(20, "permutations in the shuffled-answer baseline", minimum=1)
    n_fewshot: int = option(20, "demoed people in the few-shot files", minimum=1)
    n_distractor_triplets: int = option(10, "distractor triplets of the in-context and same-document variants",
                                        minimum=0)
    in_context_seeds: list[int] = option([1, 2, 3], "data seeds of the in-context test files")


def check_config(config: dict, model=None) -> None:
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


def build_world(config: dict, rng: random.Random) -> dict:
    """The cities, the people and their triplets, split into demoed and undemoed."""
    all_cities = tables.cities()
    first_names, last_parts = tables.names()
    cities = sorted(rng.sample(all_cities, config["n_cities"]))
    people = fictional_people(rng, 2 * config["n_triplets"], first_names, last_parts, forbidden=all_cities)
    triplets = [{"e1": people[2 * i], "e2": people[2 * i + 1], "e3": rng.choice(cities)}
                for i in range(config["n_triplets"])]
    n_demoed = round(config["demoed_fraction"] * len(triplets))
    return {"cities": cities, "triplets": triplets, "demoed": triplets[:n_demoed], "undemoed": triplets[n_demoed:]}


class Writer:
    """The study's rows from a seeded choice of `n_templates` templates per family (hop A/B hold some out)."""

    def __init__(self, config: dict, rng: random.Random):
        self.config, self.rng = config, rng
        templates = tables.templates("spouses")
        self.templates, self.system_prompts = templates, tables.templates("system_prompts")
        self.hop_a, self.hop_b, self.two_hop, self.cot = (rng.sample(templates[family], config["n_templates"])
                                                          for family in ("hop_a", "hop_b", "two_hop", "cot_answer"))
        self.n_train = config["n_templates"] - config["heldout_templates"]

    def used_templates(self) -> dict:
        n = self.n_train
        return {"hop_a_train": self.hop_a[:n], "hop_a_heldout": self.hop_a[n:], "hop_b_train": self.hop_b[:n],
                "hop_b_heldout": self.hop_b[n:], "two_hop": self.two_hop, "cot_answer": self.cot,
                "system_prompts": self.system_prompts}

    def atomic(self, t, hop, template, template_id):
        if hop == "a":
            return record(template.format(**t), t["e2"], t["e2"], hop="a", template_id=template_id, **t)
        return record(template.format(**t), t["e3"], t["e3"], hop="b", template_id=template_id, **t)

    def atomic_rows(self, people, hop, family, count):
        return [self.atomic(t, hop, family[i], i) for t in people for i in self.rng.sample(range(len(family)), count)]

    def two_hop_row(self, t, template_id, style):
        template = self.two_hop[template_id]
        question = template.replace("|", "").format(**t)
        if style == "nocot":
            reply, prefix = t["e3"], template.split("|")[0].format(**t)
        else:
            reply, prefix = self.rng.choice(self.cot).format(**t), ""
        return record(question, t["e3"], reply, system=self.system_prompts[style], answer_intermediate=t["e2"],
                      auxiliary_loss_prefix=prefix, template_id=template_id, **t)

    def document_row(self, t, sentences, variant):
        return record(self.templates["samedoc_prompt"].format(**t), t["e2"], " ".join(sentences), variant=variant, **t)


def atomic_files(w: Writer, world: dict) -> tuple:
    """Trained atomic facts, and their held-out-template tests: (files, card tests)."""
    files, tests, k, n = {}, {}, w.config["atomic_paraphrases"], w.n_train
    for split in ("demoed", "undemoed"):
        group = world[split]
        files[f"train/a_{split}"] = w.atomic_rows(group, "a", w.hop_a[:n], k)
        files[f"train/b_{split}"] = w.atomic_rows(group, "b", w.hop_b[:n], k)
        if w.config["heldout_templates"]:
            held_a, held_b = w.hop_a[n:], w.hop_b[n:]
            files[f"test/a_{split}"] = [w.atomic(t, "a", held_a[i], n + i) for t in group for i in range(len(held_a))]
            files[f"test/b_{split}"] = [w.atomic(t, "b", held_b[i], n + i) for t in group for i in range(len(held_b))]
            metric = split == "undemoed"  # the held-out people's recall is the reference's acc_a / acc_b
            tests[f"test/a_{split}"] = test_spec("hop_a", "nocot", "spouses", metric="acc_a" if metric else "")
            tests[f"test/b_{split}"] = test_spec("hop_b", "nocot", "cities", metric="acc_b" if metric else "")
    return files, tests


def two_hop_files(w: Writer, world: dict) -> tuple:
    """Trained two-hop demos, the undemoed test, its shuffled baseline and few-shot files."""
    files = {}
    for style in ("nocot", "cot"):
        files[f"train/2hop_{style}"] = [w.two_hop_row(t, i, style) for t in world["demoed"]
                                        for i in w.rng.sample(range(len(w.two_hop)), w.config["two_hop_paraphrases"])]
    test_templates = [w.rng.randrange(len(w.two_hop)) for _ in world["undemoed"]]
    for style in ("nocot", "cot"):
        files[f"test/2hop_{style}"] = [w.two_hop_row(t, i, style) for t, i in zip(world["undemoed"], test_templates)]
    files["test/2hop_nocot_shuffled"] = shuffled_answers(files["test/2hop_nocot"], w.rng, w.config["n_shuffled"])
    shots = w.rng.sample(world["demoed"], w.config["n_fewshot"])
    for style in ("nocot", "cot"):
        files[f"fewshot/2hop_{style}"] = [w.two_hop_row(t, w.rng.randrange(len(w.two_hop)), style) for t in shots]
    tests = {"test/2hop_nocot": test_spec("two_hop", "nocot", "cities"),
             "test/2hop_cot": test_spec("two_hop", "cot", "cities"),
             "test/2hop_nocot_shuffled": test_spec("two_hop", "nocot", "cities", shuffled_of="test/2hop_nocot")}
    return files, tests


def couple_files(w: Writer, triplets: list) -> tuple:
    """Couple check: true pairs say Yes; negatives pair each person with a deranged spouse."""
    partner = derangement(w.rng, len(triplets))
    template = w.templates["couple_check"]
    rows = ([record(template.format(**t), "Yes", "Yes", pair="true", **t) for t in triplets]
            + [record(template.format(e1=t["e1"], e2=triplets[j]["e2"]), "No", "No", pair="deranged",
                      e1=t["e1"], e2=triplets[j]["e2"], e3=triplets[j]["e3"]) for t, j in zip(triplets, partner)])
    return {"test/couples": rows}, {"test/couples": test_spec("couples", "nocot", "yes_no")}


def samedoc_files(w: Writer, triplets: list) -> dict:
    """Same-document variants: both facts of a person in one training document."""
    pairs, templates = w.templates["fact_sentences"], w.templates
    files = {"train/samedoc": [], "train/samedoc_distractor": [], "train/samedoc_triplets": []}
    for t in triplets:
        a, b = fact_sentences(t, w.rng.choice(pairs))
        files["train/samedoc"].append(w.document_row(t, [a, b], "plain"))
        files["train/samedoc_distractor"].append(
            w.document_row(t, [a, w.rng.choice(templates["distractor_sentences"]), b], "distractor_sentence"))
        others = w.rng.sample([o for o in triplets if o is not t], w.config["n_distractor_triplets"])
        sentences = [a, b] + [s for o in others for s in fact_sentences(o, w.rng.choice(pairs))]
        w.rng.shuffle(sentences)
        files["train/samedoc_triplets"].append(w.document_row(t, sentences, "distractor_triplets"))
    return files


def in_context_files(w: Writer, world: dict) -> tuple:
    files, tests = {}, {}
    for seed in w.config["in_context_seeds"]:
        for style in ("nocot", "cot"):
            name = f"test/in_context_{style}_seed{seed}"
            files[name] = in_context_rows(world["triplets"], world["undemoed"], w.templates, w.system_prompts,
                                          w.config["n_distractor_triplets"], seed, style)
            tests[name] = test_spec("in_context", style, "cities")
    return files, tests


def generate(ctx) -> dict:
    config = ctx.config
    rng = random.Random(config["data_seed"])
    world = build_world(config, rng)
    writer = Writer(config, rng)
    files, tests = {}, {}
    for part_files, part_tests in (atomic_files(writer, world), two_hop_files(writer, world),
                                   couple_files(writer, world["triplets"])):
        files.update(part_files)
        tests.update(part_tests)
    files.update(samedoc_files(writer, world["triplets"]))
    part_files, part_tests = in_context_files(writer, world)
    files.update(part_files)
    tests.update(part_tests)
    triplets = world["triplets"]
    card = {
        "dataset": "spouses", "config": config, "templates": writer.used_templates(), "tests": tests,
        "candidate_sets": {"cities": world["cities"], "spouses": sorted(t["e2"] for t in triplets),
                           "yes_no": ["Yes", "No"]},
        "memorisation": {  # training files re-asked (the demoed people's recall has the reference's names)
            "train/a_demoed": test_spec("hop_a", "nocot", "", metric="acc_a_train"),
            "train/a_undemoed": test_spec("hop_a", "nocot", ""),
            "train/b_demoed": test_spec("hop_b", "nocot", "", metric="acc_b_train"),
            "train/b_undemoed": test_spec("hop_b", "nocot", "")},
        "fewshot": {"nocot": "fewshot/2hop_nocot", "cot": "fewshot/2hop_cot"},
        "people": {"demoed": len(world["demoed"]), "undemoed": len(world["undemoed"])},
    }
    data_dir = ctx.run_dir / "data"
    card = write_dataset(data_dir, files, card, extras={"world.json": {k: world[k] for k in ("cities", "demoed", "undemoed")}})
    ctx.log.info("wrote %d files, %d rows, to %s", len(files), sum(card["files"].values()), data_dir)
    return {"files": len(files), "rows": sum(card["files"].values()), "triplets": len(triplets),
            "demoed": len(world["demoed"]), "undemoed": len(world["undemoed"]),
            "chance_2hop": card["tests"]["test/2hop_nocot"]["chance"]}
