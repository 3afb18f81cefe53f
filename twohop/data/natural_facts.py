"""The natural knowledge corpus: every entity type's e2 -> e3 facts in many paraphrases.

For the embedded tiny model these facts play the part pretraining plays for a real model (hop B
of the semi-synthetic study is "already known"). Nothing about fictional people is included.
"""
import random
from dataclasses import dataclass

from runner.config import option
from twohop.data import tables
from twohop.data.records import record
from twohop.data.dataset import require, test_spec, write_dataset

@dataclass
class NaturalFactsConfig:
    data_seed: int = option(0, "seed of the training rows' order")
    entity_types: str = option("all", "'all' or a comma-separated list of entity types")

# Question wrappers: the first ones are trained, the last is held out for the recall test.
QUESTION_FORMS = ["{q}", "Quick question: {q}", "{q} Answer briefly.", "Please answer: {q}",
                  "I was wondering: {q}", "Q: {q}", "Here is a question for you. {q}"]
STATEMENT_PROMPTS = ["Tell me a fact about {e2}.", "What do you know about {e2}?"]


def selected_types(config) -> list:
    value = config["entity_types"]
    if value == "all":
        return tables.entity_types()
    chosen = [t.strip() for t in value.split(",") if t.strip()]
    require(bool(chosen), "entity_types", "give 'all' or a comma-separated list of entity types")
    for entity_type in chosen:
        tables.entity_table(entity_type)  # an unknown type is a clear error
    return chosen


def check_config(config: dict, model=None) -> None:
    selected_types(config)


def fact_rows(entity_type: str, forms=QUESTION_FORMS[:-1]) -> tuple:
    """(training rows, held-out question rows) of one type's e2 -> e3 facts: every attribute asked in the
    training question `forms` and stated as a sentence, and asked once in the held-out form."""
    spec, entities = tables.entity_table(entity_type)
    train, test = [], []
    for entity in entities:
        for attribute, phrasing in spec["attributes"].items():
            fact = {"e2": entity["name"], "e3": entity[attribute], "attribute": attribute, "entity_type": entity_type}
            question = phrasing["question"].format(subject=entity["name"])
            for form in forms:
                train.append(record(form.format(q=question), fact["e3"], fact["e3"], form="question", **fact))
            statement = phrasing["statement"].format(subject=entity["name"], value=entity[attribute])
            for prompt in STATEMENT_PROMPTS:
                train.append(record(prompt.format(e2=entity["name"]), fact["e3"], statement, form="statement", **fact))
            test.append(record(QUESTION_FORMS[-1].format(q=question), fact["e3"], fact["e3"], form="question", **fact))
    return train, test


def generate(ctx) -> dict:
    rng = random.Random(ctx.config["data_seed"])
    train, test = [], []
    types = selected_types(ctx.config)
    for entity_type in types:
        type_train, type_test = fact_rows(entity_type)
        train += type_train
        test += type_test
    rng.shuffle(train)
    card = {"dataset": "natural_facts", "config": ctx.config, "entity_types": types,
            "templates": {"question_forms": QUESTION_FORMS, "statement_prompts": STATEMENT_PROMPTS},
            "tests": {"test/natural_facts": test_spec("hop_b", "nocot", "values")},
            "candidate_sets": {"values": sorted({row["answer"] for row in test})}}
    card = write_dataset(ctx.run_dir / "data", {"train/natural_facts": train, "test/natural_facts": test}, card)
    return {"train_rows": len(train), "test_rows": len(test), "entity_types": len(types)}
