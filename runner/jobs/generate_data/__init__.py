"""generate_data: every dataset of the two-hop study, deterministic and validated.

Sub-jobs: `spouses` (fully synthetic), one per entity type of `datasets/entities/schema.yaml`
(semi-synthetic, generated from that data), `natural_facts` (the tiny model's knowledge corpus)
and `real_facts` (real two-hop chains for existing models). Each writes `<run>/data/` atomically
with a `card.json`.
"""
from functools import partial

from runner.registry import Job, SubJob
from runner.jobs.generate_data import natural_facts, real_facts, semi_synthetic, spouses, tables


def generator(name, help, run, defaults, check=None) -> SubJob:
    # Every generator reads the shipped tables, so their content is part of its fingerprint.
    return SubJob("generate_data", name, help, run, defaults, check=check, project_data=("datasets",))


SUBJOBS = [
    generator("spouses", "fully synthetic spouse -> birth city study (Exp. 1, 2, 3)",
              spouses.generate, spouses.DEFAULTS, spouses.check_config),
    generator("natural_facts", "natural knowledge corpus of all entity types (tiny model's pretraining)",
              natural_facts.generate, natural_facts.DEFAULTS, natural_facts.check_config),
    generator("real_facts", "real two-hop chains (and a Hopping-Too-Late CSV loader)",
              real_facts.generate, real_facts.DEFAULTS),
] + [
    generator(entity_type, f"semi-synthetic study: favorite {spec['noun']} -> its attributes",
              partial(semi_synthetic.generate, entity_type=entity_type), semi_synthetic.DEFAULTS,
              semi_synthetic.check_config)
    for entity_type, spec in tables.entity_schema().items()
]

JOB = Job("generate_data", "generate every dataset of the two-hop study", tuple(SUBJOBS))
