"""The prompt families of the "e2 + r2 = e3" analysis (seed note 000, 25 January), one row per
entity (e2 alone) or per (entity, attribute); each selectable by name.

- e2_tell: the user turn "Tell me about {e2}"; e2_patchscope: "dog:dog, Japan:Japan, x:x, {e2}".
- e2_r2: the mean over several few-shot relation prompts "{e2_1}->{e3_1}\\n...\\n{e2}->", the
  demonstrations drawn from other entities of the same type with the same attribute.
- e3_tell, e3_patchscope: the same two forms for the attribute value e3 (e3 as input).
- e3_output: the question whose answer is e3 ("In which city is {e2}?"), averaged over phrasings.
Chat families are rendered with the model's chat template; patchscopes are raw text after BOS.
"""
import random

from twohop.evaluation import generation
from runner.errors import UserError
from twohop.data import tables
from twohop.data.natural_facts import QUESTION_FORMS

PATCHSCOPE = "dog:dog, Japan:Japan, x:x, {x}"


def chat(tokenizer, text: str) -> str:
    return generation.prompt_text(tokenizer, [{"role": "user", "content": text}])


def raw(tokenizer, text: str) -> str:
    return (tokenizer.bos_token or "") + text


def family_rows(family: str, entity_type: str, tokenizer, config: dict) -> list:
    spec, entities = tables.entity_table(entity_type)
    rng = random.Random(f"{family}:{entity_type}")
    pairs = [(e, attribute) for e in entities for attribute in spec["attributes"]]

    def row(entity, attribute, prompts, label, span):
        return {"id": f"{entity_type}/{entity['name']}/{attribute}".rstrip("/"), "family": family,
                "entity_type": entity_type, "entity": entity["name"], "attribute": attribute,
                "value": entity[attribute] if attribute else "", "label": label, "span": span, "prompts": prompts}

    if family == "e2_tell":
        return [row(e, "", [chat(tokenizer, f"Tell me about {e['name']}")], e["name"], e["name"]) for e in entities]
    if family == "e2_patchscope":
        return [row(e, "", [raw(tokenizer, PATCHSCOPE.format(x=e["name"]))], e["name"], e["name"]) for e in entities]
    if family == "e3_tell":
        return [row(e, a, [chat(tokenizer, f"Tell me about {e[a]}")], e[a], e[a]) for e, a in pairs]
    if family == "e3_patchscope":
        return [row(e, a, [raw(tokenizer, PATCHSCOPE.format(x=e[a]))], e[a], e[a]) for e, a in pairs]
    if family == "e3_output":
        forms = QUESTION_FORMS[:config["e3_output_phrasings"]]
        return [row(e, a, [chat(tokenizer, form.format(q=spec["attributes"][a]["question"].format(subject=e["name"])))
                           for form in forms], e[a], e["name"]) for e, a in pairs]
    if family == "e2_r2":
        rows = []
        for e, a in pairs:
            others = [o for o in entities if o is not e]
            shots = min(config["fewshot_shots"], len(others))
            prompts = []
            for _ in range(config["fewshot_prompts"]):
                demos = "".join(f"{o['name']}->{o[a]}\n" for o in rng.sample(others, shots))
                prompts.append(chat(tokenizer, f"{demos}{e['name']}->"))
            rows.append(row(e, a, prompts, e[a], e["name"]))
        return rows
    raise UserError(f"prompt family {family!r}: expected one of {', '.join(FAMILIES)}")


FAMILIES = ("e2_tell", "e2_patchscope", "e2_r2", "e3_tell", "e3_patchscope", "e3_output")
