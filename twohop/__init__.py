"""The science library of the two-hop toolkit.

Jobs (`runner/jobs/<job>/`) are thin declarations over it; it never imports a job or the runner's
orchestration beyond its two foundations (`runner.errors.UserError`, `runner.files` atomic writes).
- `twohop.data`: records, entity tables, dataset generators and their cards.
- `twohop.training`: typed training configs, recipes, batching, the trainer, checkpoints, stages.
- `twohop.evaluation`: generation, candidate scoring, grading, the dataset evaluator, lm-eval, in-context
  and frontier evaluations.
- `twohop.interp`: hidden states and representation analyses.
- `twohop.stats`, `twohop.plots`, `twohop.reports`: statistics, figures, summary tables and reports.
"""
