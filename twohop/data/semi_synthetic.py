"""Semi-synthetic study, one dataset per entity type: fictional hop A, real-world hop B.

Twenty fictional people each get a favorite entity of the type (hop A, trained); the two-hop
question asks an attribute of that entity, which a pretrained model knows (hop B).
"""
import random
from dataclasses import dataclass

from runner.config import option
from twohop.data.records import record
from twohop.data import natural_facts, tables
from twohop.data.dataset import fictional_people, require, shortcut_reason, shuffled_answers, test_spec, write_dataset

@dataclass
class SemiSyntheticConfig:
    data_seed: int = option(0, "seed of the fictional people, their favorites and the shuffles")
    first_hop_paraphrases: int = option(20, "training rows per person, each a different phrasing (as the reference; "
                                           "20 is every training template)", minimum=1)
    n_shuffled: int = option(5, "permutations in the shuffled-answer baseline", minimum=1)


def check_config(config: dict, model=None) -> None:
    templates = tables.templates("semi_synthetic")
    n_train = len(templates["hop_a"]) - templates["heldout"]
    require(1 <= config["first_hop_paraphrases"] <= n_train, "first_hop_paraphrases", f"must be between 1 and {n_train}")
    require(config["n_shuffled"] >= 1, "n_shuffled", "must be at least 1")


def attribute_question(spec, attribute: str, subject: str) -> str:
    return spec["attributes"][attribute]["question"].format(subject=subject)


def two_hop_rows(people, favorites, spec, attribute, style, templates, system_prompts, entity_type,
                 candidates) -> list:
    """Each person's question about an attribute of their favorite entity, answered with or without a chain."""
    phrasing, noun, rows = spec["attributes"][attribute], spec["noun"], []
    for person in people:
        entity = favorites[person]
        subject = templates["two_hop_subject"].format(e1=person, noun=noun)
        question = attribute_question(spec, attribute, subject)
        chain = {"e1": person, "e2": entity["name"], "e3": entity[attribute]}
        if style == "nocot":
            reply, prefix = chain["e3"], question[:question.index(subject) + len(subject)]
        else:
            statement = phrasing["statement"].format(subject=chain["e2"], value=chain["e3"])
            reply, prefix = templates["cot_answer"].format(noun=noun, statement=statement, **chain), ""
        rows.append(record(question, chain["e3"], reply, system=system_prompts[style],
                           answer_intermediate=chain["e2"], auxiliary_loss_prefix=prefix,
                           attribute=attribute, entity_type=entity_type, bridge_candidates=candidates, **chain,
                           shortcut=shortcut_reason(chain["e3"], e2=chain["e2"], e1=chain["e1"])))
    return rows


def attribute_files(attribute, entities, people, favorites, spec, rng, config, entity_type) -> tuple:
    """Hop B asked directly, the two-hop tests and their shuffled baseline: (files, card tests). Entities
    whose value is marked ambiguous (tables.ambiguous) are asked about in none of them. Every row lists
    every entity of the type (`bridge_candidates`): naming one is no answer, even where its name holds the
    answer ("London Symphony" for a premiere in London)."""
    templates, system_prompts = tables.templates("semi_synthetic"), tables.templates("system_prompts")
    doubtful = {name for name, columns in tables.ambiguous(entity_type, entities).items() if attribute in columns}
    entities = [e for e in entities if e["name"] not in doubtful]
    people = [p for p in people if favorites[p]["name"] not in doubtful]
    candidates = sorted(favorite["name"] for favorite in favorites.values())  # every entity, doubtful ones too
    files = {f"test/b_{attribute}": [
        record(attribute_question(spec, attribute, e["name"]), e[attribute], e[attribute], hop="b",
               e2=e["name"], e3=e[attribute], attribute=attribute,
               bridge_candidates=candidates,
               shortcut=shortcut_reason(e[attribute], e2=e["name"])) for e in entities]}
    for style in ("nocot", "cot"):
        files[f"test/{attribute}_{style}"] = two_hop_rows(people, favorites, spec, attribute, style, templates,
                                                          system_prompts, entity_type, candidates)
    true = f"test/{attribute}_nocot"
    files[f"{true}_shuffled"] = shuffled_answers(files[true], rng, config["n_shuffled"])
    tests = {f"test/b_{attribute}": test_spec("hop_b", "nocot", attribute, attribute, metric=f"acc_b_{attribute}"),
             true: test_spec("two_hop", "nocot", attribute, attribute),
             f"test/{attribute}_cot": test_spec("two_hop", "cot", attribute, attribute),
             f"{true}_shuffled": test_spec("two_hop", "nocot", attribute, attribute, shuffled_of=true)}
    return files, tests


def generate(ctx, entity_type: str) -> dict:
    config = ctx.config
    spec, entities = tables.entity_table(entity_type)
    marks = tables.ambiguous(entity_type, entities)
    templates = tables.templates("semi_synthetic")
    n_train = len(templates["hop_a"]) - templates["heldout"]
    rng = random.Random(f"{config['data_seed']}:{entity_type}")
    first_names, last_parts = tables.names()
    people = fictional_people(rng, len(entities), first_names, last_parts, forbidden={e["name"] for e in entities})
    favorites = dict(zip(people, rng.sample(entities, len(entities))))

    def hop_a_row(person, template_id):
        question = templates["hop_a"][template_id].format(e1=person, noun=spec["noun"])
        entity = favorites[person]["name"]
        return record(question, entity, entity, hop="a", e1=person, e2=entity, template_id=template_id)

    files = {"train/first_hop": [hop_a_row(p, i) for p in people
                                 for i in rng.sample(range(n_train), config["first_hop_paraphrases"])],
             "test/first_hop": [hop_a_row(p, i) for p in people for i in range(n_train, len(templates["hop_a"]))],
             # The type's natural facts as the base model learned them, replayed while fine-tuning the tiny
             # model so learning the first hop does not erase hop B; never in the bare form test/b_* asks.
             "train/natural_facts_replay": natural_facts.fact_rows(entity_type, natural_facts.QUESTION_FORMS[1:-1])[0]}
    tests = {"test/first_hop": test_spec("hop_a", "nocot", "entities", metric="acc_a")}
    candidate_sets = {"entities": sorted(e["name"] for e in entities)}
    for attribute in spec["attributes"]:
        candidate_sets[attribute] = sorted({e[attribute] for e in entities})
        attribute_tests = attribute_files(attribute, entities, people, favorites, spec, rng, config, entity_type)
        files.update(attribute_tests[0])
        tests.update(attribute_tests[1])
    card = {"dataset": entity_type, "config": config, "noun": spec["noun"], "attributes": list(spec["attributes"]),
            # Values a reference source would not settle, asked in no test: attribute -> {entity: why}.
            "ambiguous": {attribute: found for attribute in spec["attributes"]
                          if (found := {name: why[attribute] for name, why in marks.items() if attribute in why})},
            "templates": {"hop_a_train": templates["hop_a"][:n_train], "hop_a_heldout": templates["hop_a"][n_train:],
                          "two_hop_subject": templates["two_hop_subject"], "cot_answer": templates["cot_answer"],
                          "attributes": spec["attributes"], "system_prompts": tables.templates("system_prompts")},
            "tests": tests, "candidate_sets": candidate_sets, "memorisation": {}, "fewshot": {}}
    world = {"favorites": [{"e1": p, "e2": favorites[p]["name"]} for p in people]}
    card = write_dataset(ctx.run_dir / "data", files, card, extras={"world.json": world})
    return {"files": len(files), "rows": sum(card["files"].values()), "people": len(people),
            "attributes": len(spec["attributes"])}
