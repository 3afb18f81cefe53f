"""Does the embedded tiny model learn to copy a repeated sequence (an induction head), and on what data?

In-context lookup ("X's spouse is Y ... Who is X's spouse?") needs the model to find an earlier
occurrence of a name and copy what follows it. This probe isolates that skill (its drills are
`twohop.data.drills`, its loop `twohop.training.drills`, which `finetune_base`'s `drill_phases` also
runs): a fresh tiny model is trained with plain PyTorch (full next-token loss, AdamW, clipping at 1.0) on sequences that are a
random list followed by the same list again, and it prints the loss on the second copy, which only
copying can bring down. Each phase trains on one kind of list (`--phases KIND:STEPS,...`):
- `random`: random token ids from the vocabulary (the textbook setting);
- `words`: random entity words (first names, last-name parts, cities: one token each), as text;
- `vocab`: random whole-word tokens of the vocabulary (" " + letters: each is one token, as text);
- `names`: six random people built from the project's name lists ("Ulla Ravenscroft-Szymanski"),
  the kind of name the study asks the model to look up.
The key-value kinds are lookup itself: six facts "KEY SEPARATOR VALUE." with distinct keys and values,
then the six keys again in another order, each followed by its fact or asked about; the printed loss
is on the values of that second part, which only finding the key's earlier fact can bring down:
- `kv`: one-token keys (first names), the city right after the key (" Ulla Oslo.");
- `kv_is`: one-token keys, " is" between key and city (" Ulla is Oslo.");
- `kv_names_is`: whole people as keys, " is" between (" Ulla Ravenscroft-Szymanski is Oslo.");
- `kv_names_question`: the same facts, asked as " Where is Ulla Ravenscroft-Szymanski? Oslo." (the key
  is no longer right before the city, as in the study's questions);
- `kv_spouses`: the study's first fact and question, people on both sides (" Ulla Ravenscroft-Szymanski's
  spouse is Aiko Pemberton-Banerjee.", " Who is Ulla Ravenscroft-Szymanski's spouse? Aiko ...");
- `kv_spouses_born`: the same, with each spouse's second fact (" Aiko Pemberton-Banerjee was born in
  Oslo.") shuffled in among the facts, as in the study's prompts;
- `chat_spouses_born`: the same facts and one question in the study's own in-context prompt, rendered
  by the model's chat template with the no-CoT system prompt; the value is the assistant's reply;
- `chat_no_system_spouses_born`: the same without the system prompt (the user turn, then the reply);
- `prompt_spouses_born`: the study's in-context prompt as plain text, no chat template ("Here are some
  facts:", one fact a line, a blank line, the question), the value right after the question;
- `lines_spouses_born`: the same without the "Here are some facts:" line;
- `lines_question_inline_spouses_born`: one fact a line, then the question after a space (no blank line);
- `inline_question_blank_spouses_born`: the facts inline (as in `kv_spouses_born`), then a blank line and
  the question.
Their printed loss and accuracy are on the first token of each recalled value (a city is one token).
A phase may mix kinds (`KIND+KIND:STEPS`): its steps take the kinds in turn, and every `--every` steps
each of its kinds is scored on a held-out batch (drawn from a stream of its own, so the training rows
are those of the same phases unmixed). `--watch KIND,...` scores kinds that are not trained the same
way, to see when a skill learned on one layout starts to work on another.

    python bench/induction_probe.py --phases names:600
    python bench/induction_probe.py --phases random:200,names:400
    python bench/induction_probe.py --phases kv:300,kv_is:300
    python bench/induction_probe.py --questions 1 --phases random:1000,kv_spouses_born+chat_spouses_born:600 \
        --watch prompt_spouses_born
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.tiny import ALIASES, PRESETS, build_tiny_model  # noqa: E402
from runner.errors import UserError  # noqa: E402
from twohop.data.drills import FACTS_PER_ROW, KEY_VALUE_KINDS  # noqa: E402
from twohop.training.drills import KINDS, DrillSettings, parse_kinds, parse_phases, train_drills  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phases", default="names:400", help="KIND[+KIND...]:STEPS,... (a mixed phase takes its "
                        "kinds in turn; kinds: " + ", ".join(KINDS) + ")")
    parser.add_argument("--watch", default="", help="KIND,...: kinds scored on held-out batches every --every "
                        "steps without being trained")
    parser.add_argument("--preset", default="tiny-h128-l2", choices=sorted([*PRESETS, *ALIASES]),
                        help="embedded preset, built fresh into a temp folder")
    parser.add_argument("--batch_size", type=int, default=32, help="sequences per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (constant)")
    parser.add_argument("--random_length", type=int, default=24, help="tokens per random, words or vocab list")
    parser.add_argument("--min_random_length", type=int, default=None,
                        help="if set, each batch's random, words or vocab lists have a length drawn from "
                             "[this, --random_length], so the copy is no longer at a fixed distance")
    parser.add_argument("--questions", type=int, default=FACTS_PER_ROW,
                        help=f"inline key-value kinds: questions per row, 1-{FACTS_PER_ROW} (the study asks one); "
                             "the prompt-layout kinds always ask one")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights' init and of the lists")
    parser.add_argument("--every", type=int, default=50, help="print the loss every N steps")
    args = parser.parse_args()
    if args.min_random_length is None:
        args.min_random_length = args.random_length
    for name in ("batch_size", "random_length", "min_random_length", "every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if not 1 <= args.questions <= FACTS_PER_ROW:
        parser.error(f"--questions must be between 1 and {FACTS_PER_ROW}, got {args.questions}")
    if args.min_random_length > args.random_length:
        parser.error(f"--min_random_length ({args.min_random_length}) is above --random_length ({args.random_length})")
    if args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    try:
        phases = parse_phases(args.phases.split(","), "--phases")
        watched = parse_kinds(args.watch.replace(",", "+"), "--watch") if args.watch else ()
    except UserError as error:
        parser.error(str(error))
    layout_kinds = [kind for kind in {*watched, *(kind for kinds, _ in phases for kind in kinds)}
                    if kind in KEY_VALUE_KINDS and KEY_VALUE_KINDS[kind].layout]
    if layout_kinds and args.questions not in (1, FACTS_PER_ROW):
        parser.error(f"--questions {args.questions}: {layout_kinds[0]} asks one question per prompt; use --questions 1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        build_tiny_model(args.preset, folder, seed=args.seed)
        tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    settings = DrillSettings(batch_size=args.batch_size, lr=args.lr, min_list_length=args.min_random_length,
                             max_list_length=args.random_length, questions=args.questions, every=args.every)
    last = train_drills(model, tokenizer, phases, settings, args.seed, lambda entry: print(json.dumps(entry), flush=True),
                        watched)
    print(json.dumps({"phases": args.phases, "preset": args.preset, "seed": args.seed, "final": last}))


if __name__ == "__main__":
    main()
