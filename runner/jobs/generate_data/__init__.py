"""generate_data: every dataset of the two-hop study, deterministic and validated.

Sub-jobs: `spouses` (fully synthetic), one per entity type of `datasets/entities/schema.yaml`
(semi-synthetic, generated from that data), `natural_facts` (the tiny model's knowledge corpus)
`real_facts` (real two-hop chains for existing models) and `ioi` (indirect-object identification task
families, one dataset per model: its names are single tokens of that model's tokenizer). Each writes
`<run>/data/` atomically with a `card.json` that declares what every test file is.
"""
from functools import partial

from runner.registry import Job, SubJob
from twohop.data import ioi, natural_facts, real_facts, semi_synthetic, spouses, tables


def generator(name, help, run, config, check=None, external_files=None, uses_model=False) -> SubJob:
    # Every generator reads the shipped tables, so their content is part of its fingerprint.
    return SubJob("generate_data", name, help, run, config, check=check, project_data=tables.SHIPPED_DATA,
                  external_files=external_files, uses_model=uses_model)


SUBJOBS = [
    generator("spouses", "fully synthetic spouse -> birth city study (Exp. 1, 2, 3)",
              spouses.generate, spouses.SpousesConfig, spouses.check_config),
    generator("natural_facts", "natural knowledge corpus of all entity types (tiny model's pretraining)",
              natural_facts.generate, natural_facts.NaturalFactsConfig, natural_facts.check_config),
    generator("real_facts", "real two-hop chains (and a Hopping-Too-Late CSV loader)",
              real_facts.generate, real_facts.RealFactsConfig, external_files=real_facts.csv_path),
    generator("ioi", "IOI task families (seed 004: 2/3-object IOI, room, chain, distractor), clean/corrupted "
              "pairs; names one token in --model's tokenizer", ioi.generate, ioi.IoiConfig, ioi.check_config,
              uses_model=True),
] + [
    generator(entity_type, f"semi-synthetic study: favorite {spec['noun']} -> its attributes",
              partial(semi_synthetic.generate, entity_type=entity_type), semi_synthetic.SemiSyntheticConfig,
              semi_synthetic.check_config)
    for entity_type, spec in tables.entity_schema().items()
]

JOB = Job("generate_data", "generate every dataset of the study", tuple(SUBJOBS))
