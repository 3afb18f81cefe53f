"""Semi-synthetic study, one dataset per entity type: fictional hop A, real-world hop B.

Twenty fictional people each get a favorite entity of the type (hop A, trained); the two-hop
question asks an attribute of that entity, which a pretrained model knows (hop B).
"""
import random

import yaml

from runner.records import record
from runner.jobs.generate_data import tables
from runner.jobs.generate_data.dataset import fictional_people, require, shuffled_answers, write_dataset

DEFAULTS = {
    "data_seed": 0,
    "first_hop_paraphrases": 1,  # training rows per person (the reference trains 20 rows)
    "n_shuffled": 5,
}


def check_config(config: dict) -> None:
    templates = tables.templates("semi_synthetic")
    n_train = len(templates["hop_a"]) - templates["heldout"]
    require(1 <= config["first_hop_paraphrases"] <= n_train, "first_hop_paraphrases", f"must be between 1 and {n_train}")
    require(config["n_shuffled"] >= 1, "n_shuffled", "must be at least 1")


def attribute_question(spec, attribute: str, subject: str) -> str:
    return spec["attributes"][attribute]["question"].format(subject=subject)


def generate(ctx, entity_type: str) -> dict:
    config = ctx.config
    spec, entities = tables.entity_table(entity_type)
    templates = tables.templates("semi_synthetic")
    system_prompts = tables.templates("system_prompts")
    n_train = len(templates["hop_a"]) - templates["heldout"]
    rng = random.Random(f"{config['data_seed']}:{entity_type}")
    first_names, last_parts = tables.names()
    people = fictional_people(rng, len(entities), first_names, last_parts,
                              forbidden={e["name"] for e in entities})
    favorites = dict(zip(people, rng.sample(entities, len(entities))))
    noun = spec["noun"]

    def hop_a_row(person, template_id):
        question = templates["hop_a"][template_id].format(e1=person, noun=noun)
        entity = favorites[person]["name"]
        return record(question, entity, entity, hop="a", e1=person, e2=entity, template_id=template_id)

    files = {
        "train/first_hop": [hop_a_row(p, i) for p in people
                            for i in rng.sample(range(n_train), config["first_hop_paraphrases"])],
        "test/first_hop": [hop_a_row(p, i) for p in people for i in range(n_train, len(templates["hop_a"]))],
    }
    tests = {"test/first_hop": {"candidate_set": "entities"}}
    candidate_sets = {"entities": sorted(e["name"] for e in entities)}
    for attribute, phrasing in spec["attributes"].items():
        candidate_sets[attribute] = sorted({e[attribute] for e in entities})
        files[f"test/b_{attribute}"] = [
            record(attribute_question(spec, attribute, e["name"]), e[attribute], e[attribute], hop="b",
                   e2=e["name"], e3=e[attribute], attribute=attribute) for e in entities]
        for style in ("nocot", "cot"):
            rows = []
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
                                   attribute=attribute, entity_type=entity_type, **chain))
            files[f"test/{attribute}_{style}"] = rows
        files[f"test/{attribute}_nocot_shuffled"] = shuffled_answers(files[f"test/{attribute}_nocot"], rng,
                                                                     config["n_shuffled"])
        for name in (f"test/b_{attribute}", f"test/{attribute}_nocot", f"test/{attribute}_cot",
                     f"test/{attribute}_nocot_shuffled"):
            tests[name] = {"candidate_set": attribute}

    # The experiment config finetune_<type> consumes (reference format; paths relative to it).
    experiment = {
        "model_name_or_path": None,  # filled in from --model at run time
        "train_datasets": [{"name": "first_hop", "dataset_file": "train/first_hop.jsonl"}],
        "eval_datasets": [{"name": name.removeprefix("test/"), "dataset_file": f"{name}.jsonl"}
                          for name in files if name.startswith("test/")],
        "evaluations": ["acc_a", "acc_b", "acc_2hop_nocot", "acc_2hop_cot"],
    }
    card = {"dataset": entity_type, "config": config, "noun": noun, "attributes": list(spec["attributes"]),
            "templates": {"hop_a_train": templates["hop_a"][:n_train], "hop_a_heldout": templates["hop_a"][n_train:],
                          "two_hop_subject": templates["two_hop_subject"], "cot_answer": templates["cot_answer"],
                          "attributes": spec["attributes"], "system_prompts": system_prompts},
            "tests": tests, "candidate_sets": candidate_sets}
    world = {"favorites": [{"e1": p, "e2": favorites[p]["name"]} for p in people]}
    card = write_dataset(ctx.run_dir / "data", files, card, extras={
        "world.json": world, "finetune_config.yaml": yaml.safe_dump(experiment, sort_keys=False)})
    return {"files": len(files), "rows": sum(card["files"].values()), "people": len(people),
            "attributes": len(spec["attributes"])}
