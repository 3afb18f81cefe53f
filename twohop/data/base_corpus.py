"""`finetune_base`: the embedded tiny model's small "pretraining".

A real model arrives knowing the world and how to use it; the tiny model learns it here, on a
population disjoint from every experiment's (its people take their last names from
`datasets/names/base_last_name_parts.txt`, which no experiment uses):
- natural knowledge: every entity type's facts (hop B of the semi-synthetic study);
- storing facts from training and chaining them: base people's spouse / birth-city facts as
  questions, with two-hop questions answered with and without a chain of thought;
- reading facts in the prompt: the facts given in context, then a one- or two-hop question (about the
  base's own people, or with `in_context_people=fresh` about random people it never learned);
- same-document facts: both facts of a person in one document;
- copying names from the prompt ("List: ... Repeat the list."), over every name list;
- optionally (`lookup_rows`), finding a spouse among six fresh couples' facts in the prompt.
"""
import random

from twohop.data.records import read_records, record
from twohop.data import tables
from twohop.data import drills
from twohop.data.dataset import couples, fictional_people, fresh_people, random_name
from twohop.data.spouses import fact_sentences, in_context_rows

COPY_PROMPTS = ["List: {names}. Repeat the list.", "Repeat these names: {names}.", "Say these names again: {names}."]


def base_people(rng: random.Random, count: int) -> list:
    first_names, _ = tables.names()
    return couples(rng, fictional_people(rng, 2 * count, first_names, tables.base_last_parts()))


def corpus(natural_facts_file, config: dict) -> list:
    rng = random.Random(f"base:{config['data_seed']}")
    templates = tables.templates("spouses")
    system_prompts = tables.templates("system_prompts")
    rows = list(read_records(natural_facts_file))
    people = base_people(rng, config["base_people"])
    paraphrases = config["base_paraphrases"]
    for t in people:
        for template in rng.sample(templates["hop_a"], paraphrases):
            rows.append(record(template.format(**t), t["e2"], t["e2"]))
        for template in rng.sample(templates["hop_b"], paraphrases):
            rows.append(record(template.format(**t), t["e3"], t["e3"]))
        for template in rng.sample(templates["two_hop"], 2):
            question = template.replace("|", "").format(**t)
            rows.append(record(question, t["e3"], t["e3"], system=system_prompts["nocot"], answer_intermediate=t["e2"]))
            rows.append(record(question, t["e3"], rng.choice(templates["cot_answer"]).format(**t),
                               system=system_prompts["cot"], answer_intermediate=t["e2"]))
        a, b = fact_sentences(t, rng.choice(templates["fact_sentences"]))
        rows.append(record(templates["samedoc_prompt"].format(**t), t["e2"], f"{a} {b}"))
    # Facts in the prompt: one-hop questions about a stated fact and two-hop questions over them.
    known = {name for t in people for name in (t["e1"], t["e2"])}
    for seed in range(config["in_context_rounds"]):
        for style in ("nocot", "cot"):
            population = people if config["in_context_people"] == "base" else fresh_people(
                random.Random(f"fresh:{config['data_seed']}:{seed}:{style}"), len(people), known)
            targets = rng.sample(population, min(len(population), config["in_context_per_round"]))
            n_distractors = min(rng.choice([0, 1, 3, 10]), len(people) - 1)  # a small test corpus has few people
            rows.extend(in_context_rows(population, targets, templates, system_prompts, n_distractors,
                                        seed=1000 + seed, style=style))
    # Copying: one or two random names built from every name list (the experiments' included: a name
    # states no fact), so the skill transfers to people the base never saw. Mostly single names: a
    # 2-layer model learns to copy "the name in the prompt" in a few hundred steps, while copying
    # long lists needs induction heads, which take far longer to form.
    first_names, last_parts = tables.names()
    last_parts = sorted({*last_parts, *tables.base_last_parts()})
    for _ in range(config["copy_rows"]):
        names = ", ".join(random_name(rng, first_names, last_parts) for _ in range(1 if rng.random() < 0.8 else 2))
        rows.append(record(rng.choice(COPY_PROMPTS).format(names=names), names, f"{names}."))
    # Reading the prompt: the spouse-lookup drill as rows about fresh random people (its own stream, so 0
    # rows leaves the corpus as it was), to keep a lookup formed by the drill warm-up in use.
    rows.extend(drills.lookup_records(config["lookup_rows"], random.Random(f"lookup:{config['data_seed']}")))
    rng.shuffle(rows)
    return rows
